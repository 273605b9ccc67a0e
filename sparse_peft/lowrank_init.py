"""``init_lora_weights='eora'``: a mask adapter's low-rank updates computed from calibration inputs, no training.

One pass of the masked model (its hard masks, updates still zero) over the calibration token ids gathers every
masked layer's input covariance ``H = X^T X``; each layer's ``B``, ``A`` are then
:func:`~sparse_peft.lowrank.calibrated_factors` of its weight, hard mask and ``H``. All layers' ``H`` are held at
once (``4 * in^2`` bytes per layer: 0.5 GB for SmolLM2-135M).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from .layer import MaskedLinear, mask_layers
from .lowrank import calibrated_factors, calibrated_target

__all__ = ["init_lowrank_from_calibration"]


def init_lowrank_from_calibration(
    model: nn.Module,
    adapter_name: str,
    calibration: torch.Tensor,
    batch_size: int = 8,
    cache: Optional[dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> None:
    """Set ``adapter_name``'s update ``B [out, r]``, ``A [r, in]`` in every mask layer of ``model`` from
    ``calibration`` (token ids ``[num_samples, seq_len]``); see the module docstring.

    ``model`` is called as ``model(input_ids=..., use_cache=False)`` in eval mode with ``adapter_name`` active in
    the mask layers; the train/eval flags and the active adapters are restored afterwards.

    ``cache``: a dict to keep, per ``(layer name, placement)``, the layer's ``H`` and its full-rank target
    (:func:`~sparse_peft.lowrank.calibrated_target`, which does not depend on the rank) and to reuse them from, so
    that adapters of several ranks on the same base, mask and calibration compute them once (the forward pass is
    skipped when every layer is cached). It holds ``4 * (in^2 + out * in)`` bytes per layer.
    """
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point()):
        raise ValueError(
            "init_lora_weights='eora' needs MaskConfig.calibration: token ids, a LongTensor [num_samples, seq_len] "
            "(e.g. sparse_peft.data.calibration_from_texts(texts, tokenizer))."
        )
    cache = {} if cache is None else cache
    layers = {name: layer for name, layer in mask_layers(model, adapter_name).items() if layer.lowrank(adapter_name)}
    placement = {name: layer.maskllm_spec[adapter_name].placement for name, layer in layers.items()}
    missing = [name for name in layers if (name, placement[name]) not in cache]
    sums = {name: torch.zeros(layers[name].weight_shape[1], layers[name].weight_shape[1], dtype=torch.float64,
                              device=layers[name].base_weight().device) for name in missing}

    def accumulate(name: str, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        sums[name].addmm_(x.T, x)

    with _active(model, adapter_name), torch.no_grad(), contextlib.ExitStack() as hooks:
        if missing:
            for name in missing:
                handle = layers[name].register_forward_hook(lambda module, args, output, name=name: accumulate(name,
                                                                                                            args))
                hooks.callback(handle.remove)
            device = next(model.parameters()).device
            for batch in calibration.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
        for name, layer in layers.items():
            weight, mask = layer.base_weight(), layer.hard_mask(adapter_name)
            if name in sums:
                hessian = sums.pop(name).float()
                cache[name, placement[name]] = (hessian, calibrated_target(weight, mask, hessian, placement[name]))
            hessian, target = cache[name, placement[name]]
            lora_a, lora_b, scale = layer.lowrank(adapter_name)
            b, a = calibrated_factors(weight, mask, hessian, lora_a.shape[0], placement[name], target=target)
            lora_a.copy_(a)
            lora_b.copy_(b / scale)


@contextlib.contextmanager
def _active(model: nn.Module, adapter_name: str):
    """Eval mode with ``adapter_name`` the active adapter of every mask layer (dense where a layer does not hold
    it, as ``set_adapter`` would make it); restored after."""
    training = [(module, module.training) for module in model.modules()]
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    saved = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        model.eval()
        for layer in layers:
            layer._active_adapter, layer._disable_adapters = [adapter_name], False
        yield
    finally:
        for layer, active, disabled in saved:
            layer._active_adapter, layer._disable_adapters = active, disabled
        for module, mode in training:
            module.training = mode
