"""One-shot N:M pruners: magnitude, Wanda and SparseGPT, as mask priors and as baselines.

Targets are ``nn.Linear`` layers or GPT-2 ``Conv1D`` layers (whose weight is stored ``[in, out]``); weights,
scores and masks are always handled in the ``[out, in]`` layout. Every pruner turns a saliency score into an
exact N:M mask with :func:`sparse_peft.patterns.topn_mask` (keep the ``n`` highest-scoring weights of every
group of ``m`` consecutive input-dimension weights).

* ``magnitude``: score ``|W|``. Needs no data.
* ``wanda``: score ``|W_ij| * ||X_j||_2``, the norm of input feature ``j`` over all calibration tokens.
* ``sparsegpt``: the OBS procedure of SparseGPT (Frantar & Alistarh, 2023) with the Hessian
  ``H = 2 X X^T / tokens``. With ``update_weights=False`` (MaskLLM's prior) only its mask is kept; with
  ``update_weights=True`` (the SparseGPT baseline) the reconstructed weights are written into the model.

The data-driven pruners work block by block, like the reference implementations: the inputs of the first
transformer block are captured once, then every block is pruned from the outputs of the already-pruned
blocks before it. Shapes: a weight is ``[out, in]``, calibration is ``[num_samples, seq_len]`` token ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import transpose
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .constants import ONE_SHOT_PRIORS
from .patterns import check_groupable, topn_mask, validate_n_m
from .utils import fan_in_fan_out, weight_out_in

#: The pruners :func:`compute_prior_masks` implements.
PRIOR_METHODS = ONE_SHOT_PRIORS

#: The layers a prior can prune: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D`` (weight ``[in, out]``).
_Prunable = nn.Linear | Conv1D

#: Where the transformer blocks live in common architectures (Llama-style, GPT-2-style), tried first.
_KNOWN_BLOCK_PATHS = ("model.layers", "transformer.h")


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def compute_prior_masks(
    model: nn.Module,
    method: str,
    n: int,
    m: int,
    target_names: list[str],
    calibration: torch.Tensor | None = None,
    *,
    update_weights: bool = False,
    blocksize: int | None = None,
    percdamp: float = 0.01,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Compute an N:M mask for every target linear layer with a one-shot pruner.

    Args:
        model: a causal LM (called as ``model(input_ids=..., use_cache=False)``) for ``wanda``/``sparsegpt``;
            any module for ``magnitude``. It is run in eval mode under ``torch.no_grad()``; every module's
            training flag is restored afterwards.
        method: one of :data:`PRIOR_METHODS`.
        n, m: keep ``n`` weights in every group of ``m`` consecutive input-dimension weights.
        target_names: names as in ``model.named_modules()``, each an ``nn.Linear`` or a GPT-2 ``Conv1D`` whose
            input dimension is divisible by ``m``. For ``wanda``/``sparsegpt`` all of them must sit inside the
            transformer blocks.
        calibration: ``[num_samples, seq_len]`` token ids (see :func:`sparse_peft.data.calibration_from_texts`);
            required by ``wanda`` and ``sparsegpt``.
        update_weights: ``sparsegpt`` only. ``False`` (MaskLLM's prior, "mask-only"): the model's weights stay
            bit-identical, the mask is chosen by the full OBS procedure on a scratch copy. ``True`` (the
            SparseGPT baseline): the pruned and OBS-updated weights are written into the targets in place.
        blocksize: SparseGPT's column block size (a multiple of ``m``); it changes speed, not the result. Default:
            the largest multiple of ``m`` not above 128.
        percdamp: SparseGPT dampening, added to the Hessian diagonal as a fraction of its mean.
        batch_size: calibration sequences per forward pass.
        show_progress: show a tqdm bar over the transformer blocks.

    Block by block, the statistics of all targets of one block are gathered in a single pass over inputs that
    come from the already-pruned earlier blocks, while the block itself is still dense (what Wanda does and
    what SparseGPT's reference does within a block). The block is then run again with its masks applied (the
    masked weights for mask-only, the updated weights for ``update_weights=True``) to give the next block's
    inputs; for mask-only the original weight tensors are put back right after that pass.

    Returns:
        ``{name: bool mask [out, in]}`` on the CPU, ``True`` = kept, exactly ``n`` per group of ``m``.

    Raises:
        ValueError: for an unknown method, invalid ``n``/``m``/``blocksize``/``batch_size``, missing or
            malformed calibration, ``update_weights=True`` with a method other than ``sparsegpt``, a target that
            is not an ``nn.Linear``/``Conv1D`` of the model or whose input dimension is not divisible by ``m``,
            or (for the data-driven methods) targets outside the transformer blocks.
    """
    if blocksize is None and isinstance(m, int) and m > 0:  # an invalid m is reported by the checks below
        blocksize = max(m, 128 // m * m)
    _validate_options(method, n, m, calibration, update_weights, blocksize, batch_size)
    linears = _resolve_targets(model, target_names, m)
    if method == "magnitude":
        return {name: topn_mask(_weight_out_in(layer).abs().float(), n, m).cpu() for name, layer in linears.items()}
    with torch.no_grad(), _eval_mode(model):
        return _prune_block_by_block(
            model, method, n, m, linears, calibration, update_weights, blocksize, percdamp, batch_size, show_progress
        )


def _validate_options(
    method: str,
    n: int,
    m: int,
    calibration: torch.Tensor | None,
    update_weights: bool,
    blocksize: int | None,
    batch_size: int,
) -> None:
    """Raise ``ValueError`` for any argument of :func:`compute_prior_masks` that does not depend on the model."""
    if method not in PRIOR_METHODS:
        raise ValueError(f"Unknown prior method {method!r}; valid methods are: {', '.join(PRIOR_METHODS)}.")
    validate_n_m(n, m)
    if update_weights and method != "sparsegpt":
        raise ValueError(
            f"update_weights=True is only defined for method='sparsegpt' (the OBS weight update), not {method!r}."
        )
    if method == "magnitude":
        return
    if calibration is None:
        raise ValueError(
            f"method={method!r} needs calibration data: pass `calibration`, a [num_samples, seq_len] tensor of "
            "token ids (e.g. from sparse_peft.data.calibration_from_texts)."
        )
    if calibration.dim() != 2 or calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise ValueError(
            "calibration must be a 2-D integer tensor of token ids [num_samples, seq_len], got "
            f"dtype {calibration.dtype} and shape {tuple(calibration.shape)}."
        )
    if blocksize < 1 or blocksize % m:
        raise ValueError(f"blocksize must be a positive multiple of m={m}, got {blocksize}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")


def _resolve_targets(model: nn.Module, target_names: list[str], m: int) -> dict[str, _Prunable]:
    """Map every target name to its layer, checking that its input dimension splits into groups of ``m``."""
    if not target_names:
        raise ValueError("target_names is empty: name at least one linear layer of the model to prune.")
    modules = dict(model.named_modules())
    linears = {}
    for name in target_names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"Target {name!r} is not a module of the model (names are as in model.named_modules()).")
        if not isinstance(module, _Prunable):
            raise ValueError(f"Target {name!r} is a {type(module).__name__}, not an nn.Linear or a GPT-2 Conv1D.")
        check_groupable(_weight_out_in(module).shape, m, name)
        linears[name] = module
    return linears


def _weight_out_in(layer: _Prunable) -> torch.Tensor:
    """The layer's weight data as ``[out, in]``, without autograd: a view that shares storage."""
    return weight_out_in(layer).detach()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the ``with`` body, then restore every submodule's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


# --------------------------------------------------------------------------------------------------------------
# Block-by-block driver (wanda, sparsegpt)
# --------------------------------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised by a forward hook to end a model's or a block's forward once it has recorded what it needs (the first
    block's inputs, a layer group's input covariance)."""


@dataclass
class _BlockInput:
    """Everything a transformer block is called with, for one calibration mini-batch."""

    hidden: torch.Tensor  # [batch, seq_len, hidden_size], model dtype
    args: tuple[Any, ...]  # positional arguments after the hidden states (GPT-2 passes some)
    kwargs: dict[str, Any]  # attention_mask, position_embeddings, position_ids, ...


def _prune_block_by_block(
    model: nn.Module,
    method: str,
    n: int,
    m: int,
    linears: dict[str, _Prunable],
    calibration: torch.Tensor,
    update_weights: bool,
    blocksize: int,
    percdamp: float,
    batch_size: int,
    show_progress: bool,
) -> dict[str, torch.Tensor]:
    """Prune the targets block after block; see :func:`compute_prior_masks` for the order of passes."""
    prefix, blocks = find_blocks(model, list(linears))
    per_block = targets_per_block(prefix, len(blocks), linears)
    last = max(i for i, targets in enumerate(per_block) if targets)
    inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
    masks: dict[str, torch.Tensor] = {}
    progress = tqdm(range(last + 1), desc=f"{method} {n}:{m}", unit="block", disable=not show_progress)
    for i in progress:
        targets = per_block[i]
        block_masks = _prune_block(blocks[i], method, n, m, targets, inputs, update_weights, blocksize, percdamp)
        masks.update({name: mask.cpu() for name, mask in block_masks.items()})
        if i < last:
            applied = {} if update_weights else {name: block_masks[name] for name in targets}
            with _masked_weights(targets, applied):
                inputs = run_block(blocks[i], inputs)
    return masks


def find_blocks(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its name: ``(prefix, blocks)``.

    Tries the Llama (``model.layers``) and GPT-2 (``transformer.h``) layouts first, then the first
    ``nn.ModuleList`` (in ``named_modules`` order) that holds one of the targets. Raises ``ValueError`` if none
    does, or if some target lies outside the blocks found.
    """
    modules = dict(model.named_modules())
    known = [path for path in _KNOWN_BLOCK_PATHS if isinstance(modules.get(path), nn.ModuleList)]
    generic = [name for name, module in modules.items() if name and isinstance(module, nn.ModuleList)]
    for prefix in known + generic:
        inside = [name for name in target_names if name.startswith(prefix + ".")]
        if not inside:
            continue
        outside = sorted(set(target_names) - set(inside))
        if outside:
            raise ValueError(
                f"Layer-by-layer pruning needs every target inside the transformer blocks {prefix!r}, but these are "
                f"not: {outside}. Prune them with method='magnitude' or leave them out."
            )
        return prefix, modules[prefix]
    raise ValueError(
        "Could not find the model's transformer blocks: no nn.ModuleList (such as model.layers or transformer.h) "
        "contains any of the targets. Layer-by-layer pruning (wanda, sparsegpt) needs one."
    )


def targets_per_block(prefix: str, num_blocks: int, linears: dict[str, _Prunable]) -> list[dict[str, _Prunable]]:
    """Split the targets by block: entry ``i`` holds the targets named ``f"{prefix}.{i}.*"``."""
    per_block: list[dict[str, _Prunable]] = [{} for _ in range(num_blocks)]
    for name, linear in linears.items():
        per_block[int(name[len(prefix) + 1 :].split(".")[0])][name] = linear
    return per_block


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int
) -> list[_BlockInput]:
    """Run the model on the calibration batches up to the first block and record that block's call arguments."""
    captured: list[_BlockInput] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.append(_BlockInput(hidden, rest, kwargs))
        raise StopForward

    device = input_device(model)
    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != len(calibration.split(batch_size)):
        raise RuntimeError("The model's forward did not call its first transformer block once per batch.")
    return captured


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids must live: the device of its input embeddings (else of its first parameter)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def run_block(block: nn.Module, inputs: list[_BlockInput]) -> list[_BlockInput]:
    """Run ``block`` on every mini-batch; the outputs, with the same extra arguments, are the next block's inputs."""
    return [_BlockInput(call_block(block, batch), batch.args, batch.kwargs) for batch in inputs]


def call_block(block: nn.Module, batch: _BlockInput) -> torch.Tensor:
    """The block's output hidden states ``[batch, seq_len, hidden_size]`` for one mini-batch."""
    hidden = block(batch.hidden, *batch.args, **batch.kwargs)
    if isinstance(hidden, (tuple, list)):  # older-style blocks return (hidden_states, ...)
        hidden = hidden[0]
    return hidden


@contextlib.contextmanager
def _masked_weights(linears: dict[str, _Prunable], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Swap in ``W * mask`` for each named layer during the ``with`` body, then put the original tensors back.

    ``masks`` are ``[out, in]``; the originals are kept by reference, so they come back bit-identical.
    """
    originals = {name: linears[name].weight.data for name in masks}
    try:
        for name, mask in masks.items():
            stored = transpose(mask, fan_in_fan_out(linears[name]))  # the weight's own layout
            linears[name].weight.data = originals[name] * stored.to(originals[name].device, originals[name].dtype)
        yield
    finally:
        for name, weight in originals.items():
            linears[name].weight.data = weight


# --------------------------------------------------------------------------------------------------------------
# One block: input statistics, then masks
# --------------------------------------------------------------------------------------------------------------


class _ColumnSquares:
    """Running ``sum over tokens of x_j^2`` per input feature: ``[in]`` float32 (Wanda's ``||X_j||_2^2``)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.total = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs ``[..., in]``."""
        self.total += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)


class _Hessian:
    """Running ``X X^T`` over tokens: ``[in, in]`` float32, and the number of tokens seen."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs ``[..., in]``."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.xxt.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """SparseGPT's layer Hessian ``H = 2 X X^T / tokens``, ``[in, in]`` float32."""
        return self.xxt * (2.0 / self.tokens)


def _prune_block(
    block: nn.Module,
    method: str,
    n: int,
    m: int,
    targets: dict[str, _Prunable],
    inputs: list[_BlockInput],
    update_weights: bool,
    blocksize: int,
    percdamp: float,
) -> dict[str, torch.Tensor]:
    """Masks of one block's targets (device of each weight); writes SparseGPT's weights if ``update_weights``."""
    if not targets:
        return {}
    stats = _collect_stats(block, targets, inputs, _ColumnSquares if method == "wanda" else _Hessian)
    masks = {}
    for name, linear in targets.items():
        weight = _weight_out_in(linear).float()
        if method == "wanda":
            masks[name] = topn_mask(weight.abs() * stats[name].total.sqrt(), n, m)
            continue
        masks[name], pruned = _sparsegpt(weight, stats[name].hessian(), n, m, blocksize, percdamp)
        if update_weights:
            _weight_out_in(linear).copy_(pruned)
    return masks


def _collect_stats(
    block: nn.Module, targets: dict[str, _Prunable], inputs: list[_BlockInput], stat_cls: type
) -> dict[str, Any]:
    """Accumulate ``stat_cls`` over each target's inputs while running the dense block on every mini-batch."""
    stats = {name: stat_cls(_weight_out_in(layer).shape[1], layer.weight.device) for name, layer in targets.items()}
    handles = [
        linear.register_forward_hook(lambda module, args, output, stat=stats[name]: stat.add(args[0]))
        for name, linear in targets.items()
    ]
    try:
        for batch in inputs:
            call_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


# --------------------------------------------------------------------------------------------------------------
# SparseGPT on one layer
# --------------------------------------------------------------------------------------------------------------


def _sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, blocksize: int, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M OBS pruning of one layer (the reference ``fasterprune`` algorithm).

    Columns are pruned left to right in blocks of ``blocksize``. At the start of every group of ``m`` columns
    the group's mask keeps the ``n`` weights with the largest saliency ``w^2 / d^2``, computed from the current
    (already updated) weights, where ``d_j`` is the ``j``-th diagonal entry of the upper Cholesky factor of
    ``H^-1`` (``d_j^2`` is the inverse Hessian's diagonal entry once the columns before ``j`` are eliminated).
    Each pruned column's error is spread over the later columns with the OBS update, lazily across blocks.
    Input features that were never active (``H_jj = 0``) are zeroed first, as in the reference.

    Args:
        weight: ``[out, in]`` float32; not modified.
        hessian: ``[in, in]`` float32, ``2 X X^T / tokens``.

    Returns:
        ``(mask, pruned)``: the bool mask ``[out, in]`` (``True`` = kept) and the updated weights ``[out, in]``
        float32, exactly zero where the mask is ``False``.
    """
    w = weight.clone()
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_hessian_cholesky(hessian, percdamp)  # [in, in], upper triangular
    mask = torch.zeros_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        errors = _prune_column_block(w[:, start:end], mask[:, start:end], hinv[start:end, start:end], n, m)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return mask, w


def _prune_column_block(
    w: torch.Tensor, mask: torch.Tensor, hinv: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """Prune one column block in place: fill ``mask`` and update ``w`` column by column.

    Args:
        w: ``[out, B]`` float32 view of the weights (updated in place; pruned entries become exactly zero).
        mask: ``[out, B]`` bool view of the mask (filled in place).
        hinv: ``[B, B]`` block of the upper Cholesky factor of ``H^-1``.

    Returns:
        ``[out, B]`` the scaled errors ``(w_j - q_j) / d_j`` that the later blocks must absorb.
    """
    errors = torch.zeros_like(w)
    diagonal = hinv.diagonal()
    for j in range(w.shape[1]):
        if j % m == 0:
            mask[:, j : j + m] = topn_mask(w[:, j : j + m] ** 2 / diagonal[j : j + m] ** 2, n, m)
        kept = w[:, j] * mask[:, j]
        errors[:, j] = (w[:, j] - kept) / diagonal[j]
        w[:, j:] -= errors[:, j : j + 1] * hinv[j : j + 1, j:]
        w[:, j] = kept
    return errors


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + percdamp * mean(diag H) * I)^-1``, ``[in, in]``."""
    damped = hessian + percdamp * hessian.diagonal().mean() * torch.eye(
        hessian.shape[0], dtype=hessian.dtype, device=hessian.device
    )
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"SparseGPT: the damped layer Hessian is not positive definite (percdamp={percdamp}); "
            "use a larger percdamp or more calibration data."
        ) from error
