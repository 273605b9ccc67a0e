"""Applying the annealing of tau, kappa and the sparse regulariser to a model, for ``Trainer`` and custom loops,
logging them with the mask's statistics, and completing ``Trainer`` checkpoints with what resuming needs.

The values per step are :func:`sparse_peft.annealing.schedule_at`'s.
"""

from __future__ import annotations

import os
import warnings

import safetensors.torch
import torch
import torch.nn as nn
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers import DefaultFlowCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import MaskConfig
from .layer import MaskedLinear
from .model import MaskModel
from .utils import atomic_write


def _mask_model(model: nn.Module) -> MaskModel:
    """Find the :class:`~sparse_peft.model.MaskModel` inside a PeftModel (or DDP / accelerate wrapper)."""
    for module in model.modules():
        if isinstance(module, MaskModel):
            return module
    raise ValueError("The model has no mask adapter: wrap it with get_peft_model(model, MaskConfig(...)) first.")


def update_mask_schedule(model: nn.Module, step: int, max_steps: int) -> None:
    """Set tau, kappa and lambda of every mask adapter of ``model`` for optimizer step ``step`` of ``max_steps``.

    Call it before each optimizer step in a custom training loop; :class:`MaskScheduleCallback` does it for
    ``Trainer``.
    """
    _mask_model(model).set_mask_schedule(step, max_steps)


def save_checkpoint_logits(
    model: nn.Module, checkpoint_dir: str | os.PathLike, is_main_process: bool = True
) -> list[str]:
    """Rewrite the mask adapters' weight files in ``checkpoint_dir`` with their float logits; returns their names.

    ``checkpoint_dir`` is a folder that ``model.save_pretrained`` (or ``Trainer``) has just written: the adapter
    ``"default"`` at its top, any other in a subfolder of its name. Each mask adapter that holds float logits gets
    its ``adapter_model.safetensors`` replaced by the same records plus the float32 ``[G, C]``
    logits, as ``MaskConfig(save_logits=True)`` would write them; loading the folder with ``is_trainable=True``
    (as ``Trainer(resume_from_checkpoint=...)`` does) then restores the logits exactly. ``adapter_config.json`` is
    left as written, and the adapters' configs keep their ``save_logits``, so later ``save_pretrained`` calls
    write what they wrote before. Adapters loaded for inference hold only their hard mask, which the file already
    has; they are left alone. All files are encoded before the first is replaced, each replacement is atomic, and
    an error (e.g. NaN logits) leaves every file as it was.

    Call it on every process: with sharded (FSDP) logits the full state dict is gathered, which needs all ranks;
    only ``is_main_process`` writes.
    """
    peft_model = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    if peft_model is None:
        raise ValueError("save_checkpoint_logits needs a PeftModel with a mask adapter (from get_peft_model).")
    layers = [m for m in peft_model.modules() if isinstance(m, MaskedLinear)]
    adapters = [
        name
        for name, config in peft_model.peft_config.items()
        if isinstance(config, MaskConfig)
        and any(name in m.maskllm_logits and m.maskllm_logits[name].is_floating_point() for m in layers)
    ]
    if not adapters:
        return []
    state_dict = _full_state_dict(model, peft_model)
    if not is_main_process:
        return adapters
    folder = os.fspath(checkpoint_dir)
    files = {
        name: os.path.join(folder, *([] if name == "default" else [name]), SAFETENSORS_WEIGHTS_NAME)
        for name in adapters
    }
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} does not exist: save_checkpoint_logits completes a folder that save_pretrained has "
            "written; call model.save_pretrained(checkpoint_dir) first."
        )
    encoded = {}
    for name, path in files.items():
        config = peft_model.peft_config[name]
        saved_flag = config.save_logits
        config.save_logits = True
        try:
            tensors = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=name)
        finally:
            config.save_logits = saved_flag
        encoded[path] = safetensors.torch.save(
            {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}
        )
    for path, data in encoded.items():
        atomic_write(path, lambda f, data=data: f.write(data))
    return adapters


def _full_state_dict(model: nn.Module, peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of ``model`` (keys as in ``peft_model``'s), gathered from all ranks, if its parameters
    are sharded (FSDP1 or FSDP2); else None, and PEFT reads the unsharded parameters itself."""
    sharded = any(isinstance(p, DTensor) for p in peft_model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )
    if not sharded:
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


#: Groups per chunk when the logging statistics go over a layer's ``[G, C]`` logits.
_STATS_CHUNK = 1 << 20


def mask_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The chosen pattern of each group: ``argmax`` of ``[G, C]`` logits as uint8 ``[G]`` (on the logits' device),
    computed in chunks without autograd. A sharded (FSDP2 ``DTensor``) tensor gives its local shard's groups."""
    logits = logits.to_local() if isinstance(logits, DTensor) else logits
    with torch.no_grad():
        return torch.cat([chunk.argmax(dim=-1).to(torch.uint8) for chunk in logits.detach().split(_STATS_CHUNK)])


def mask_max_prob_sum(logits: torch.Tensor, kappa: float) -> float:
    """Sum over the groups of ``[G, C]`` logits of the largest pattern probability, ``max softmax(kappa * logits)``:
    the categorical distribution the Gumbel-softmax samples from. Chunked, without autograd; local shard only for
    a ``DTensor``."""
    logits = logits.to_local() if isinstance(logits, DTensor) else logits
    with torch.no_grad():
        return sum(
            float(torch.softmax(kappa * chunk.float(), dim=-1).amax(dim=-1).sum())
            for chunk in logits.detach().split(_STATS_CHUNK)
        )


def trained_mask_layers(model: nn.Module) -> dict[str, list[MaskedLinear]]:
    """``{adapter name: its layers}`` for the mask adapters of ``model`` that hold trainable float logits."""
    adapters: dict[str, list[MaskedLinear]] = {}
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            for name, logits in module.maskllm_logits.items():
                if logits.is_floating_point() and logits.requires_grad:
                    adapters.setdefault(name, []).append(module)
    return adapters


def place_mask_callback(trainer) -> TrainerCallback:
    """Move ``trainer``'s :class:`MaskScheduleCallback` (adding one if it has none) right after ``Trainer``'s
    ``DefaultFlowCallback``, before the ``report_to`` integrations, so that these receive the mask statistics the
    callback adds to each log. Returns the callback."""
    callbacks = trainer.callback_handler.callbacks
    ours = next((cb for cb in callbacks if isinstance(cb, MaskScheduleCallback)), None) or MaskScheduleCallback()
    if ours in callbacks:
        callbacks.remove(ours)
    flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
    callbacks.insert(flow + 1, ours)
    return ours


class MaskScheduleCallback(TrainerCallback):
    """Anneals tau, kappa and the regulariser weight per optimizer step of a ``Trainer`` run, and completes its
    checkpoints for resuming.

    ``Trainer(..., callbacks=[MaskScheduleCallback()])``. Uses ``state.global_step`` and ``state.max_steps``, so
    it follows gradient accumulation and resumed runs.

    ``Trainer`` saves an adapter in a checkpoint through ``save_pretrained``, which writes the hard mask only
    (``save_logits=False``). After each checkpoint this callback rewrites the checkpoint's adapter files with the
    float logits (:func:`save_checkpoint_logits`), so ``trainer.train(resume_from_checkpoint=...)`` continues from
    the trained logits and ends with the same adapter as an uninterrupted run. With ``save_only_model=True``, whose
    checkpoints ``Trainer`` cannot resume from, the checkpoints stay as ``save_pretrained`` wrote them.

    Every training log (the ones with ``loss``, every ``logging_steps``) gets, per trained mask adapter, the values
    in force for the last step and two statistics of its logits: ``tau``, ``kappa``, ``mask_flip_rate`` (fraction
    of groups whose chosen pattern changed since the previous log; the first log: since training began) and
    ``mask_max_prob`` (mean over groups of the largest pattern probability, ``softmax(kappa * logits)``; 1 means a
    settled mask). An adapter other than ``"default"`` gets its name as a suffix (``tau_<name>``). They go into
    ``state.log_history`` and, with the callback placed before the ``report_to`` integrations
    (:func:`place_mask_callback`, which :func:`~sparse_peft.training.learn_mask` calls), to TensorBoard, W&B etc.
    """

    def __init__(self) -> None:
        self._last_choice: dict[tuple[str, int], torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._last_choice = {
            (name, i): mask_argmax(layer.maskllm_logits[name])
            for name, layers in trained_mask_layers(model).items()
            for i, layer in enumerate(layers)
        }

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        added = {}
        for name, layers in trained_mask_layers(model).items():
            schedule = _mask_model(model).mask_schedule(name)
            flips = groups = 0
            prob_sum = 0.0
            for i, layer in enumerate(layers):
                logits = layer.maskllm_logits[name]
                choice = mask_argmax(logits)
                last = self._last_choice.get((name, i))
                flips += int((choice != last).sum()) if last is not None and last.shape == choice.shape else 0
                self._last_choice[(name, i)] = choice
                groups += choice.numel()
                prob_sum += mask_max_prob_sum(logits, schedule.kappa)
            suffix = "" if name == "default" else f"_{name}"
            added[f"tau{suffix}"] = schedule.tau
            added[f"kappa{suffix}"] = schedule.kappa
            added[f"mask_flip_rate{suffix}"] = flips / max(1, groups)
            added[f"mask_max_prob{suffix}"] = prob_sum / max(1, groups)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("loss") is logs["loss"]:
            state.log_history[-1].update(added)  # Trainer appended its copy of these logs before calling back

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.max_steps, state.max_steps)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.save_only_model:
            return
        checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and not os.path.isdir(checkpoint_dir):
            # hyperparameter search puts a trial's checkpoints in a subfolder of output_dir that callbacks are not told
            warnings.warn(
                f"MaskScheduleCallback: no checkpoint folder {checkpoint_dir}, so its mask adapter holds the hard mask "
                "only and resuming from it restarts from that mask. Save the trial's adapter with "
                "sparse_peft.schedule.save_checkpoint_logits(model, <checkpoint folder>).",
                stacklevel=2,
            )
            return
        save_checkpoint_logits(model, checkpoint_dir, is_main_process=args.should_save)
