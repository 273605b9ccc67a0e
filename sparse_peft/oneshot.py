"""One-shot pruning as a mask adapter: :func:`prune` wraps a model in a ``PeftModel`` whose mask is a pruner's."""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model

from .config import MaskConfig
from .constants import PEFT_KEY_PREFIX
from .layer import mask_layers, set_masks
from .pruners import compute_prior_masks


def prune(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor | None = None,
    *,
    n: int = 2,
    m: int = 4,
    target_modules: list[str] | str | None = None,
    update_weights: bool = False,
    show_progress: bool = True,
) -> PeftModel:
    """Prune ``model`` one-shot and return it as a ``PeftModel`` whose mask adapter is exactly that mask.

    The standalone form of ``MaskConfig(prior=method, calibration=...)``: the adapter's hard masks equal the
    pruner's masks (no prior noise), so ``save_pretrained`` stores the one-shot mask and ``sparse-peft eval``
    measures it. With ``update_weights=True`` (SparseGPT only) the base weights are also changed in place; use
    ``merge_and_unload()`` and save the model, since such an adapter only fits the updated weights.

    ``calibration`` is ``[num_samples, seq_len]`` token ids (for ``wanda`` and ``sparsegpt``, see
    :func:`sparse_peft.data.calibration_from_texts`); ``target_modules`` as in :class:`~sparse_peft.MaskConfig`.
    """
    config = MaskConfig(n=n, m=m, target_modules=target_modules, prior=method, init_weights=False)
    peft_model = get_peft_model(model, config)
    linears = {name: f"{PEFT_KEY_PREFIX}{name}.base_layer" for name in mask_layers(peft_model)}
    with peft_model.disable_adapter():
        masks = compute_prior_masks(
            peft_model, method, n, m, list(linears.values()), calibration,
            update_weights=update_weights, show_progress=show_progress,
        )
    set_masks(peft_model, {name: masks[linear] for name, linear in linears.items()})
    return peft_model
