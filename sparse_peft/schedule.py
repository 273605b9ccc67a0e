"""Annealing of tau, kappa and the sparse regulariser over training, for ``Trainer`` and for custom loops."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from transformers import TrainerCallback


@dataclass
class MaskSchedule:
    """The annealed hyper-parameters in force at one training step.

    One instance per adapter is shared by all of its layers, so updating it once per step updates the model.
    """

    tau: float  # Gumbel-softmax temperature
    kappa: float  # logit scale
    sparse_reg: float  # lambda of the sparse weight regulariser


def schedule_at(config, step: int, max_steps: int) -> MaskSchedule:
    """Values at optimizer step ``step`` of ``max_steps`` (0-based), linear from start to end.

    The last step (``max_steps - 1``) uses the end values: tau -> ``tau_end``, kappa -> ``kappa_end``,
    lambda -> 0. Steps past the end keep the end values.
    """
    progress = min(1.0, max(0.0, step / max(1, max_steps - 1)))

    def lerp(start: float, end: float) -> float:
        return start * (1.0 - progress) + end * progress  # exact at both ends

    return MaskSchedule(
        tau=lerp(config.tau_start, config.tau_end),
        kappa=lerp(config.kappa_start, config.kappa_end),
        sparse_reg=lerp(config.sparse_reg, 0.0),
    )


def _mask_model(model: nn.Module):
    """Find the :class:`~sparse_peft.model.MaskModel` inside a PeftModel (or DDP / accelerate wrapper)."""
    from .model import MaskModel

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


class MaskScheduleCallback(TrainerCallback):
    """Anneals tau, kappa and the regulariser weight per optimizer step of a ``Trainer`` run.

    ``Trainer(..., callbacks=[MaskScheduleCallback()])``. Uses ``state.global_step`` and ``state.max_steps``, so
    it follows gradient accumulation and resumed runs.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.max_steps, state.max_steps)
