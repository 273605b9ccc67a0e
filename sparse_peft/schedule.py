"""Applying the annealing of tau, kappa and the sparse regulariser to a model, for ``Trainer`` and custom loops.

The values per step are :func:`sparse_peft.annealing.schedule_at`'s.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import TrainerCallback

from .model import MaskModel


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


class MaskScheduleCallback(TrainerCallback):
    """Anneals tau, kappa and the regulariser weight per optimizer step of a ``Trainer`` run.

    ``Trainer(..., callbacks=[MaskScheduleCallback()])``. Uses ``state.global_step`` and ``state.max_steps``, so
    it follows gradient accumulation and resumed runs.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        update_mask_schedule(model, state.max_steps, state.max_steps)
