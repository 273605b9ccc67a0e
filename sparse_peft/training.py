"""Mask learning with ``Trainer``: token windows from text, MaskLLM's reference optimizer settings, and an
optional distillation loss from the dense model."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .constants import LOGITS
from .layer import set_soft_mask_memory
from .optim import BF16AdamW
from .schedule import MaskScheduleCallback, place_mask_callback
from .teacher import TEACHER_COLUMNS, add_teacher_outputs, predicting_positions_mean, top_k_distillation_loss


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


def bf16_logits_optimizer(args: TrainingArguments) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: AdamW for bfloat16 logits.

    :class:`~sparse_peft.optim.BF16AdamW`: the update is computed in float32 and the logit rounded to bfloat16
    stochastically, so an update below half a bfloat16 step (2^-8 of the logit) moves the logit in expectation
    instead of never; the moments are bfloat16, so ``MaskConfig(logits_dtype="bfloat16")`` holds 12 bytes per masked
    2:4 weight (logits, gradients, two moments; 24 in float32). Betas, epsilon and learning rate come from ``args``
    (weight decay per parameter group, as ``Trainer`` sets it). :func:`learn_mask` uses it by itself for bfloat16
    logits.
    """
    return BF16AdamW, dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def _autocast_dtype(args: TrainingArguments) -> Optional[torch.dtype]:
    """The dtype ``Trainer`` autocasts its forwards to under ``args`` (``bf16`` / ``fp16``), else None."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def _has_bf16_logits(model) -> bool:
    """True if any trainable mask logits of ``model`` are bfloat16."""
    return any(
        p.requires_grad and p.dtype == torch.bfloat16 for name, p in model.named_parameters() if LOGITS in name
    )


def dense_distillation_loss(
    logits: torch.Tensor, dense_logits: torch.Tensor, labels: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean KL(p_dense || p_masked) in nats over the positions that predict a token.

    ``logits`` / ``dense_logits``: ``[batch, seq, vocab]`` next-token logits of the masked and the dense model.
    ``labels``: ``[batch, seq]`` as for the LM loss (see :func:`~sparse_peft.teacher.predicting_positions_mean`);
    without labels every position counts. Computed in fp32; a scalar with gradient through ``logits`` only.
    """
    if logits.shape != dense_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and dense_logits {tuple(dense_logits.shape)} differ in shape.")
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(dense_logits.detach().float(), dim=-1)
    per_position = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # [batch, seq]
    return predicting_positions_mean(per_position, labels)


class DenseDistillationTrainer(Trainer):
    """``Trainer`` for a mask adapter whose loss is :func:`dense_distillation_loss` from the dense model.

    The teacher is the same frozen base with the mask adapter disabled (``disable_adapter()``): no second copy of
    the weights, one extra forward pass without gradient per step. When the training examples carry the teacher's
    cached top-k outputs (:func:`~sparse_peft.teacher.add_teacher_outputs`), there is no teacher forward: the loss is
    :func:`~sparse_peft.teacher.top_k_distillation_loss` from those columns. Each position then brings the dense
    model's whole next-token distribution instead of one label. Not in the MaskLLM paper, which trains on the LM loss;
    docs/training.md has the measured comparison and step times.

    The model must be a ``PeftModel`` without ``modules_to_save``: a head trained next to the mask has no dense
    counterpart to learn from. Or pass ``teacher``, a separate frozen dense model with the same vocabulary (kept in
    eval mode), for a student with no adapter to disable (e.g. a merged sparse model whose kept weights train). The
    loss is a mean per micro-batch; Trainer divides it by the gradient-accumulation steps. The logged loss is the KL
    alone: a ``sparse_reg > 0`` regulariser acts through its gradient only.
    """

    def __init__(self, *args: Any, teacher: Optional[torch.nn.Module] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = None if teacher is None else teacher.eval()
        peft_model = self.accelerator.unwrap_model(self.model)
        if teacher is None and not hasattr(peft_model, "disable_adapter"):
            raise TypeError(
                f"DenseDistillationTrainer needs a PeftModel (its teacher is the base with the adapter disabled); got "
                f"{type(peft_model).__name__}. Wrap the model with get_peft_model(model, MaskConfig(...)) first, or "
                "pass teacher=<the dense model>."
            )
        trained_heads = sorted(getattr(peft_model, "modules_to_save", None) or ())
        if trained_heads:
            raise ValueError(
                f"DenseDistillationTrainer: modules_to_save {trained_heads} are trained next to the mask, and the "
                "dense model has no trained counterpart to distil them from. Train with the task loss (plain Trainer) "
                "instead."
            )
        # Our loss is not normalised by Trainer's token count: let Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        # keep the cached teacher columns, which are not arguments of the model's forward
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += list(TEACHER_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in TEACHER_COLUMNS}
        if all(column in inputs for column in TEACHER_COLUMNS):
            outputs = model(**model_inputs)
            teacher = (inputs[column] for column in TEACHER_COLUMNS)
            loss = top_k_distillation_loss(outputs.logits, *teacher, inputs.get("labels"))
            return (loss, outputs) if return_outputs else loss
        with torch.no_grad():
            if self.teacher is not None:
                dense_logits = self.teacher(**model_inputs).logits
            else:
                peft_model = self.accelerator.unwrap_model(model)
                with peft_model.disable_adapter():
                    dense_logits = peft_model(**model_inputs).logits
        outputs = model(**model_inputs)
        loss = dense_distillation_loss(outputs.logits, dense_logits, inputs.get("labels"))
        return (loss, outputs) if return_outputs else loss


def learn_mask(
    model,
    train_dataset: Dataset,
    args: TrainingArguments,
    callbacks: Iterable = (),
    recompute_soft_mask: Optional[bool] = None,
    distill: bool = False,
    resume_from_checkpoint: Optional[str | bool] = None,
    data_collator: Optional[Callable] = None,
    eval_dataset: Optional[Dataset] = None,
    print_logs: bool = True,
    teacher_top_k: Optional[int] = None,
    teacher_cache: Optional[str] = None,
) -> Trainer:
    """Train the mask logits of a ``get_peft_model(..., MaskConfig(...))`` model; returns the finished Trainer.

    Adds :class:`~sparse_peft.MaskScheduleCallback` before the ``report_to`` integrations
    (:func:`~sparse_peft.schedule.place_mask_callback`), so tau, kappa and lambda anneal over ``args.max_steps``
    and the logs (``state.log_history`` and every integration) get tau, kappa and the mask's statistics.
    ``recompute_soft_mask`` (if not None) is passed to :func:`~sparse_peft.layer.set_soft_mask_memory` first:
    False keeps each layer's soft-mask weights for backward (6 bytes per masked weight for 2:4, one Gumbel sample
    per step instead of two: faster steps), True keeps only the noise seed (least memory).
    ``distill=True`` trains on the KL divergence from the dense model (:class:`DenseDistillationTrainer`) instead of
    the LM loss of the labels; with ``teacher_top_k`` the dense model's top-k next-token distribution of every
    training example is computed once (in the precision of the training forwards: under autocast with
    ``args.bf16`` / ``args.fp16``) and cached on disk (:func:`~sparse_peft.teacher.add_teacher_outputs`, folder
    ``teacher_cache``, default under ``$SPARSE_PEFT_CACHE``; the teacher pass takes
    ``args.per_device_eval_batch_size`` windows at a time), and the steps run no teacher forward: the loss is the KL
    over the teacher's top k tokens and the rest (:func:`~sparse_peft.teacher.top_k_distillation_loss`).
    ``resume_from_checkpoint`` goes to ``trainer.train``: a checkpoint folder of an
    earlier run with the same ``args``, or True for the latest one in ``args.output_dir``. Checkpoints (``args``
    with ``save_strategy`` / ``save_steps``) hold the float logits (see :class:`~sparse_peft.MaskScheduleCallback`),
    so a resumed run ends with the same adapter as an uninterrupted one. ``data_collator`` goes to ``Trainer`` (e.g.
    ``DataCollatorWithPadding`` for examples of different lengths; default: ``default_data_collator``, which needs
    equal lengths such as :func:`text_windows`). ``eval_dataset`` goes to ``Trainer`` too (evaluated as
    ``args.eval_strategy`` says, with the hard mask: the model is in eval mode there). ``print_logs=False`` keeps
    Trainer's progress bar but not the log dicts it prints under it (:class:`ProgressBarCallback`); the logs still
    go to ``state.log_history`` and the ``report_to`` integrations.

    Trainable bfloat16 logits (``MaskConfig(logits_dtype="bfloat16")``) are trained with
    :func:`bf16_logits_optimizer` (stochastic rounding); ``args.optim`` is then not used.

    Warns when ``args.max_steps`` asks for more sequences than ``train_dataset`` holds: ``Trainer`` then goes over
    the text again, and a mask memorises text it has seen (see :func:`_warn_if_text_repeats`).
    """
    if teacher_top_k is not None and not distill:
        raise ValueError("teacher_top_k caches the dense model's outputs for distillation: pass distill=True too.")
    _warn_if_text_repeats(train_dataset, args, distill)
    if teacher_top_k is not None:
        train_dataset = add_teacher_outputs(model, train_dataset, teacher_top_k, args.per_device_eval_batch_size,
                                            teacher_cache, show_progress=not args.disable_tqdm,
                                            autocast_dtype=_autocast_dtype(args))
    if recompute_soft_mask is not None:
        set_soft_mask_memory(model, recompute_soft_mask)
    trainer_class = DenseDistillationTrainer if distill else Trainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        callbacks=[MaskScheduleCallback(), *callbacks], data_collator=data_collator,
        optimizer_cls_and_kwargs=bf16_logits_optimizer(args) if _has_bf16_logits(model) else None,
    )
    place_mask_callback(trainer)
    if not print_logs:
        _progress_bar_without_logs(trainer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    return trainer


class ProgressBarCallback(ProgressCallback):
    """Trainer's progress bars without the log dicts :class:`~transformers.ProgressCallback` writes under them
    (each ``logging_steps`` log's loss, learning rate and mask statistics, and the closing ``train_runtime`` /
    ``train_loss`` summary)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _progress_bar_without_logs(trainer: Trainer) -> None:
    """Replace ``trainer``'s printing of the logs (``ProgressCallback``, or ``PrinterCallback`` under
    ``disable_tqdm``) with :class:`ProgressBarCallback` (no bar either under ``disable_tqdm``)."""
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.remove_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(ProgressBarCallback())


def _warn_if_text_repeats(train_dataset, args: TrainingArguments, distill: bool) -> None:
    """Warn if ``max_steps`` optimizer steps need more sequences than the dataset holds (all processes together).

    With the LM loss a mask memorises text it sees again; the KL from the dense model is the way out the warning
    names when ``distill`` is False (docs/training.md has the measurements).
    """
    if args.max_steps <= 0 or not hasattr(train_dataset, "__len__") or len(train_dataset) == 0:
        return
    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    passes = args.max_steps * per_step / len(train_dataset)
    if passes > 1:
        warnings.warn(
            f"{args.max_steps} steps x {per_step} sequences go over the {len(train_dataset)} training examples "
            f"{passes:.2f} times; a mask can memorise text it sees again. Pass more distinct text or fewer steps"
            + ("." if distill else ", or distill=True (the KL from the dense model suffers less from repeated text)."),
            stacklevel=3,
        )
