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
"""

from __future__ import annotations

import contextlib

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

__all__ = ["init_lowrank_from_calibration"]


def init_lowrank_from_calibration(
    model: nn.Module, adapter_name: str, calibration: torch.Tensor, batch_size: int = 8
) -> None:
    """Set ``adapter_name``'s update ``B [out, r]``, ``A [r, in]`` in every mask layer of ``model`` from
    ``calibration`` (token ids ``[num_samples, seq_len]``); see the module docstring.

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
        return
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
