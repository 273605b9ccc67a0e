"""``init_lora_weights='eora'``: a mask adapter's low-rank updates computed from calibration inputs, no training.

Sequential, like SparseGPT and the GPTQ-based EoRA reference: the first transformer block's inputs are captured
once; then, block after block, each group of masked layers that reads the same input (q/k/v, then o, then gate/up,
then down in a Llama block) gets its input covariance ``H = X^T X`` from a pass of the block in which the layers
before it already carry their updates, and its ``B``, ``A`` from :func:`~sparse_peft.lowrank.calibrated_factors`
of its weight, hard mask and ``H``. The updated block then gives the next block's inputs. So every update corrects
the error that reaches its layer from the already-corrected layers before it, not the error of the mask-only model.
Cost: per input group one pass of the block that stops where the next group's input begins, and one full pass per
block (about three and a half forwards of the model for a Llama), plus the least-squares solves; memory: one
group's ``H`` at a time and the calibration activations of one block.

Then every ``B`` is multiplied by one factor (``MaskConfig.eora_scale``). Layer by layer the fit restores each
layer's dense output, but on a mask learned end to end, whose layers compensate for one another, the whole fit
overshoots: on SmolLM2-135M with the learned general mask and TinyStories calibration, factor 1 makes held-out
perplexity worse than the mask alone and 0.5 much better (benchmarks/README.md). ``"auto"`` picks, of
:data:`AUTO_SCALES`, the factor whose model output (the last hidden states) on the calibration inputs is closest,
in squared error, to the dense model's: one dense forward and one per factor over the calibration tokens.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence, Union

import torch
import torch.nn as nn

from .layer import MaskedLinear, mask_layers
from .lowrank import calibrated_factors
from .pruners import (
    StopForward,
    call_block,
    capture_block_inputs,
    find_blocks,
    run_block,
    targets_per_block,
)

__all__ = ["AUTO_SCALES", "init_lowrank_from_calibration", "scale_update_to_calibration"]

logger = logging.getLogger(__name__)

#: The factors ``eora_scale="auto"`` chooses from.
AUTO_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def init_lowrank_from_calibration(
    model: nn.Module, adapter_name: str, calibration: torch.Tensor, batch_size: int = 8,
    factor: Union[float, str] = 1.0,
) -> float:
    """Set ``adapter_name``'s update ``B [out, r]``, ``A [r, in]`` in every mask layer of ``model`` from
    ``calibration`` (token ids ``[num_samples, seq_len]``), then multiply every ``B`` by ``factor`` (a number, or
    ``"auto"``: :func:`scale_update_to_calibration`); see the module docstring. Returns the factor applied.

    ``model`` (a ``PeftModel`` or the model it wraps) is called as ``model(input_ids=..., use_cache=False)`` up to
    its first transformer block, in eval mode with ``adapter_name`` active in the mask layers; the train/eval flags
    and the active adapters are restored afterwards. Every layer with an update must sit inside the transformer
    blocks.
    """
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point()):
        raise ValueError(
            "init_lora_weights='eora' needs MaskConfig.calibration: token ids, a LongTensor [num_samples, seq_len] "
            "(e.g. sparse_peft.data.calibration_from_texts(texts, tokenizer))."
        )
    modules = {module: name for name, module in model.named_modules()}
    layers = {modules[layer]: layer for layer in mask_layers(model, adapter_name).values()
              if layer.lowrank(adapter_name) is not None}
    if not layers:
        return 1.0
    with _active(model, adapter_name), torch.no_grad():
        prefix, blocks = find_blocks(model, list(layers))
        per_block = targets_per_block(prefix, len(blocks), layers)
        last = max(i for i, targets in enumerate(per_block) if targets)
        inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
        for i in range(last + 1):
            remaining = dict(per_block[i])
            while remaining:
                group, hessians = _next_input_group(blocks[i], remaining, inputs)
                for name in group:
                    layer = remaining.pop(name)
                    lora_a, lora_b, scale = layer.lowrank(adapter_name)
                    b, a = calibrated_factors(layer.base_weight(), layer.hard_mask(adapter_name), hessians[name],
                                              lora_a.shape[0], layer.maskllm_spec[adapter_name].placement)
                    lora_a.copy_(a)
                    lora_b.copy_(b / scale)
            if i < last:
                inputs = run_block(blocks[i], inputs)
    return scale_update_to_calibration(model, adapter_name, calibration, factor, batch_size)


def scale_update_to_calibration(
    model: nn.Module, adapter_name: str, calibration: torch.Tensor,
    scales: Union[str, float, Sequence[float]] = "auto", batch_size: int = 8,
) -> float:
    """Multiply every ``B`` of ``adapter_name``'s updates by the factor of ``scales`` whose model brings its last
    hidden states on ``calibration`` (token ids ``[num_samples, seq_len]``) closest to the dense model's (mask
    layers disabled), by the sum of squared differences over all tokens; returns that factor. ``scales``: a
    sequence of factors >= 0, ``"auto"`` (:data:`AUTO_SCALES`) or one number (``MaskConfig.eora_scale``'s values);
    a single factor is applied without running the model.

    ``model`` is called as ``model(input_ids=..., use_cache=False, output_hidden_states=True)`` in eval mode, once
    per batch of ``batch_size`` rows for the dense model and once per factor; the train/eval flags and the active
    adapters are restored afterwards, and so is every ``B`` if a forward fails. The model with factor 0 is the mask
    alone.
    """
    if scales == "auto":
        scales = AUTO_SCALES
    elif isinstance(scales, (int, float)):
        scales = (float(scales),)
    if not scales or min(scales) < 0:
        raise ValueError(f"scales must be a non-empty sequence of numbers >= 0, got {scales!r}.")
    layers = [layer for layer in mask_layers(model, adapter_name).values() if layer.lowrank(adapter_name) is not None]
    if not layers:
        return 1.0
    fitted = [layer.lowrank(adapter_name)[1].detach().clone() for layer in layers]
    if len(scales) == 1:
        with torch.no_grad():
            _scale_updates(layers, adapter_name, fitted, scales[0])
        return scales[0]
    errors = [0.0] * len(scales)
    with _active(model, adapter_name), torch.no_grad():
        device = next(model.parameters()).device
        try:
            for batch in calibration.split(batch_size):
                batch = batch.to(device)
                with _dense(model):
                    dense = _last_hidden(model, batch)
                for k, factor in enumerate(scales):
                    _scale_updates(layers, adapter_name, fitted, factor)
                    errors[k] += (_last_hidden(model, batch) - dense).square().sum().item()
        except BaseException:
            _scale_updates(layers, adapter_name, fitted, 1.0)  # a failed choice leaves B as it was
            raise
    best = scales[min(range(len(scales)), key=errors.__getitem__)]
    with torch.no_grad():
        _scale_updates(layers, adapter_name, fitted, best)
    logger.info("eora_scale='auto': factor %s (squared error of the last hidden states to the dense model's: %s)",
                best, ", ".join(f"{f}: {e:.4g}" for f, e in zip(scales, errors)))
    return best


def _scale_updates(layers, adapter_name: str, fitted: list, factor: float) -> None:
    """``B = factor * fitted`` in each layer."""
    for layer, b in zip(layers, fitted):
        torch.mul(b, factor, out=layer.lowrank(adapter_name)[1])


def _last_hidden(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's last hidden states ``[batch, seq, hidden]`` as float32."""
    return model(input_ids=batch, use_cache=False, output_hidden_states=True).hidden_states[-1].float()


def _next_input_group(
    block: nn.Module, remaining: dict[str, MaskedLinear], inputs: list
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """One pass of ``block`` over ``inputs``: the first-called of the ``remaining`` layers and those that read the
    very same input tensor in that call (e.g. q/k/v), and their ``H = X^T X`` (float32 ``[in, in]``, one tensor
    shared by the group) over all calibration batches. Each batch's pass stops at the first remaining layer that
    reads another input: the rest of the block is not needed for this group."""
    group: list[str] = []
    hessian: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []  # this batch's group input, kept alive to compare by identity

    def record(name: str, args: tuple) -> None:
        x = args[0]
        if not seen:  # the group's input in this batch
            seen.append(x)
            flat = x.reshape(-1, x.shape[-1]).float()
            if not hessian:
                hessian.append(torch.zeros(flat.shape[1], flat.shape[1], dtype=flat.dtype, device=flat.device))
            hessian[0].addmm_(flat.T, flat)
        elif x is not seen[0]:
            raise StopForward  # the next group's layer: nothing after it is needed
        if name not in group:
            group.append(name)

    with contextlib.ExitStack() as hooks:
        for name, layer in remaining.items():
            handle = layer.register_forward_pre_hook(lambda module, args, name=name: record(name, args))
            hooks.callback(handle.remove)
        for batch in inputs:
            seen.clear()
            with contextlib.suppress(StopForward):
                call_block(block, batch)
    if not group:
        raise RuntimeError(f"The block's forward did not call the mask layers {sorted(remaining)}.")
    return group, {name: hessian[0] for name in group}


@contextlib.contextmanager
def _dense(model: nn.Module):
    """Every mask layer disabled (the dense model) inside :func:`_active`; its settings restored after."""
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


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
