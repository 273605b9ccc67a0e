"""Task re-selection of a general mask (``MaskConfig(prior=<general mask adapter>, prior_reselect=f)``).

A general mask was learned on broad text; a one-shot SparseGPT mask of the task's own text knows the task but
nothing else. Per layer, of the groups where the two choose different patterns, the fraction ``f`` whose Wanda
saliency on the task's calibration inputs, ``sum_j |W_ij| * ||X_j||_2`` over the group's kept weights, gains most
by switching takes SparseGPT's pattern; every other group keeps the general mask's. The result is still exactly
N:M, and a task adapter started from it is saved delta-coded against the general mask like any other.

Cost: SparseGPT's block-by-block pass over the calibration tokens plus one forward of the dense model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .pruners import compute_prior_masks, input_device
from .utils import weight_out_in

__all__ = ["input_column_norms", "reselect_masks", "reselect_to_calibration"]


def input_column_norms(model: nn.Module, target_names: list[str], calibration: torch.Tensor,
                       batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: ||X_j||_2}``, float32 ``[in]``: the norm over all calibration tokens of each input feature ``j`` of
    each named linear layer, from forwards of ``model`` (as it is) over ``calibration`` (token ids
    ``[num_samples, seq_len]``, ``batch_size`` sequences at a time), under ``torch.no_grad()``."""
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        squares = x.detach().reshape(-1, x.shape[-1]).float().square().sum(dim=0)
        sums[name] = squares if name not in sums else sums[name] + squares

    handles = [model.get_submodule(name).register_forward_hook(lambda mod, args, out, name=name: record(name, args[0]))
               for name in target_names]
    device = input_device(model)
    try:
        with torch.no_grad():
            for batch in calibration.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in target_names if name not in sums]
    if missing:
        raise RuntimeError(f"The model's forward did not call the layers {missing[:3]} on the calibration tokens.")
    return {name: total.sqrt() for name, total in sums.items()}


def reselect_masks(general: torch.Tensor, task: torch.Tensor, score: torch.Tensor, m: int,
                   fraction: float) -> torch.Tensor:
    """One layer's re-selected mask, bool ``[out, in]``.

    Args:
        general, task: bool ``[out, in]`` N:M masks (``True`` = kept), groups of ``m`` consecutive inputs.
        score: ``[out, in]`` saliency of each weight (Wanda's ``|W_ij| * ||X_j||_2``).
        fraction: in ``[0, 1]``: of the groups where ``general`` and ``task`` differ, the
            ``floor(fraction * count)`` whose kept score gains most with ``task``'s pattern take it.
    """
    shape = general.shape
    general, task = general.reshape(-1, m), task.reshape(-1, m)
    score = score.reshape(-1, m).float()
    gain = (score * task).sum(dim=1) - (score * general).sum(dim=1)
    differ = torch.nonzero((general != task).any(dim=1)).flatten()
    switch = torch.zeros(general.shape[0], dtype=torch.bool, device=general.device)
    count = int(fraction * differ.numel())
    if count:
        switch[differ[gain[differ].topk(count).indices]] = True
    return torch.where(switch[:, None], task, general).reshape(shape)


def reselect_to_calibration(model: nn.Module, general: dict[str, torch.Tensor], linears: dict[str, str],
                            calibration: torch.Tensor, n: int, m: int, fraction: float) -> dict[str, torch.Tensor]:
    """The general masks ``{name: bool [out, in]}`` re-selected for the task of ``calibration`` (module docstring).

    ``linears`` maps each name of ``general`` to its linear module in ``model``, which must compute its dense
    outputs; its weights are left bit-identical. Returns the new masks on the CPU, same keys.
    """
    names = [linears[name] for name in general]
    task = compute_prior_masks(model, "sparsegpt", n, m, names, calibration=calibration)
    norms = input_column_norms(model, names, calibration)
    masks = {}
    for name, mask in general.items():
        linear = linears[name]
        weight = weight_out_in(model.get_submodule(linear)).detach()
        score = weight.abs().float() * norms[linear].to(weight.device)
        masks[name] = reselect_masks(mask.cpu(), task[linear], score.cpu(), m, fraction)
    return masks
