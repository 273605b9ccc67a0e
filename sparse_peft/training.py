"""Mask learning with ``Trainer``: token windows from text and MaskLLM's reference optimizer settings."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from .layer import set_soft_mask_memory
from .schedule import MaskScheduleCallback


def text_windows(texts: Iterable[str], tokenizer, seq_len: int, max_windows: Optional[int] = None) -> Dataset:
    """Tokenise ``texts`` joined with "\\n\\n" once and cut non-overlapping ``seq_len``-token training windows.

    Returns a ``Dataset`` with ``input_ids`` and ``labels`` (equal; the model shifts them), ``[seq_len]`` each.
    The trailing partial window is dropped. Raises if the text holds less than one window.
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"The training text has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    windows = ids[: count * seq_len].view(count, seq_len).tolist()
    return Dataset.from_dict({"input_ids": windows, "labels": windows})


def mask_training_arguments(
    output_dir: str,
    max_steps: int,
    per_device_train_batch_size: int,
    learning_rate: float = 5e-4,
    min_learning_rate: Optional[float] = None,
    **overrides: Any,
) -> TrainingArguments:
    """``TrainingArguments`` with the MaskLLM reference optimiser for the logits.

    AdamW (betas 0.9 / 0.95, eps 1e-5, weight decay 0.1), learning rate cosine-decayed to
    ``min_learning_rate`` (default lr / 10, i.e. 5e-4 -> 5e-5), no warm-up, gradient clipping at 1.0, no
    checkpoints unless asked. ``overrides`` are passed to ``TrainingArguments``.
    """
    kwargs = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": learning_rate / 10 if min_learning_rate is None else min_learning_rate},
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def learn_mask(
    model,
    train_dataset: Dataset,
    args: TrainingArguments,
    callbacks: Iterable = (),
    recompute_soft_mask: Optional[bool] = None,
) -> Trainer:
    """Train the mask logits of a ``get_peft_model(..., MaskConfig(...))`` model; returns the finished Trainer.

    Adds :class:`~sparse_peft.MaskScheduleCallback`, so tau, kappa and lambda anneal over ``args.max_steps``.
    ``recompute_soft_mask`` (if not None) is passed to :func:`~sparse_peft.layer.set_soft_mask_memory` first:
    False keeps each layer's soft-mask weights for backward (6 bytes per masked weight for 2:4, one Gumbel sample
    per step instead of two: ~10% faster steps on CPU), True keeps only the noise seed (least memory).
    """
    if recompute_soft_mask is not None:
        set_soft_mask_memory(model, recompute_soft_mask)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, callbacks=[MaskScheduleCallback(), *callbacks]
    )
    trainer.train()
    model.eval()
    return trainer
