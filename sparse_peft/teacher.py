"""Teacher outputs computed once: the dense model's top-k next-token distribution over a training set, cached on disk,
and the KL divergence from it.

Distillation (``learn_mask(..., distill=True)``) runs the dense model on every training batch, although the batches
are the same text in every epoch, seed and run. :func:`add_teacher_outputs` runs it once per example and stores, per
position, the ``k`` most likely next tokens with their log-probabilities and the log of the mass left outside them,
as three extra dataset columns (:data:`TEACHER_COLUMNS`). :class:`~sparse_peft.training.DenseDistillationTrainer`
then computes :func:`top_k_distillation_loss` from those columns instead of running the teacher.

That loss is the exact KL divergence between the *coarsened* distributions over ``k + 1`` outcomes (the teacher's
top ``k`` tokens and "any other token"). It is never more than the full KL (coarsening loses information), equals it
when the teacher puts no mass outside its top ``k``, and has the full KL's minimum: the student matches the teacher
on the top ``k`` and on the rest's total mass.

The cache is keyed by a content hash of the base model's weights, of the examples' ``input_ids`` /
``attention_mask`` and of ``k``, and written all-or-nothing, so any later run on the same text and base finds it.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from .constants import PREFIX
from .utils import atomic_folder, cache_dir

__all__ = [
    "TEACHER_COLUMNS",
    "add_teacher_outputs",
    "model_fingerprint",
    "predicting_positions_mean",
    "teacher_top_k",
    "top_k_distillation_loss",
]

#: The dataset columns of :func:`add_teacher_outputs`, per example of ``seq`` tokens: int32 ``[seq, k]`` token ids,
#: float16 ``[seq, k]`` log-probabilities (nats) of those tokens, float32 ``[seq]`` log of the mass outside them.
TEACHER_IDS, TEACHER_LOGPROBS, TEACHER_REST = "teacher_top_ids", "teacher_top_logprobs", "teacher_rest_logprob"
TEACHER_COLUMNS = (TEACHER_IDS, TEACHER_LOGPROBS, TEACHER_REST)
#: The columns of an example that decide the teacher's outputs (hashed into the cache key).
_INPUT_COLUMNS = ("input_ids", "attention_mask")
#: Bumped when the stored format changes, so that an old cache is not read as a new one.
_FORMAT = "teacher-top-k-v1"


def predicting_positions_mean(per_position: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_position [batch, seq]`` over the positions that predict a token.

    ``labels``: ``[batch, seq]`` as for the LM loss (the model shifts them); position ``t`` counts when
    ``labels[:, t + 1] != -100``, so prompts masked out of the LM loss are left out. ``None``: every position counts.
    """
    if labels is None:
        return per_position.mean()
    if labels.shape != per_position.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the logits' [batch, seq] {tuple(per_position.shape)}."
        )
    counted = F.pad(labels[:, 1:] != -100, (0, 1), value=False)  # the last position predicts nothing
    if not counted.any():
        raise ValueError("Every label is -100: no position predicts a token, so there is nothing to distil.")
    return per_position[counted].mean()


def teacher_top_k(dense_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` next-token distribution: ``[..., vocab]`` logits -> ids int32 ``[..., k]``,
    log-probabilities float16 ``[..., k]`` (nats) and the log of the remaining mass float32 ``[...]`` (``-inf`` when
    ``k`` is the whole vocabulary). Computed in float32."""
    if not 1 <= k <= dense_logits.shape[-1]:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {dense_logits.shape[-1]}; got {k}.")
    log_p = F.log_softmax(dense_logits.float(), dim=-1)
    top_logprobs, top_ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids.to(torch.int32), top_logprobs.to(torch.float16), rest


class _LogProbsAt(torch.autograd.Function):
    """``log_softmax(logits, -1).gather(-1, ids)`` at least in float32, holding one vocabulary-sized tensor in forward
    (the log-probabilities, kept for backward, as the LM loss's cross-entropy keeps them) and making one in backward
    (the gradient ``onehot(ids) * g - softmax * sum(g)``), where autograd's ``logsumexp`` and ``gather`` make several.

    ``logits`` ``[..., vocab]`` (any float dtype; the gradient comes back in it), ``ids`` ``[..., k]`` int64;
    returns ``[..., k]``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))
        ctx.save_for_backward(logprobs, ids)
        ctx.logits_dtype = logits.dtype
        return logprobs.gather(-1, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logprobs, ids = ctx.saved_tensors
        grad_logits = logprobs.exp().mul_(-grad.sum(-1, keepdim=True)).scatter_add_(-1, ids, grad)
        return grad_logits.to(ctx.logits_dtype), None


def top_k_distillation_loss(
    logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    rest_logprob: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean KL(p_dense || p_masked) in nats between the distributions coarsened to the teacher's top ``k`` tokens and
    the rest, over the positions that predict a token (:func:`predicting_positions_mean`).

    ``logits``: the student's ``[batch, seq, vocab]``; ``top_ids`` / ``top_logprobs`` ``[batch, seq, k]`` and
    ``rest_logprob`` ``[batch, seq]`` from :func:`teacher_top_k`. Computed in fp32; gradient through ``logits``
    only. With ``k`` the whole vocabulary this is :func:`~sparse_peft.training.dense_distillation_loss`.
    """
    if top_ids.shape[:-1] != logits.shape[:-1] or rest_logprob.shape != logits.shape[:-1]:
        raise ValueError(
            f"teacher outputs {tuple(top_ids.shape)} / {tuple(rest_logprob.shape)} do not match the logits "
            f"{tuple(logits.shape)}: the cached teacher outputs belong to other examples."
        )
    q_top = _LogProbsAt.apply(logits, top_ids.long())  # [batch, seq, k], float32
    # log of the student's mass outside the teacher's top k, log(1 - sum exp(q_top)), from the k values alone (no
    # second vocabulary-sized tensor); clamped at a mass of ~1e-7 so that it stays finite when k is the vocabulary
    q_rest = torch.log(-torch.expm1(q_top.logsumexp(-1).clamp(max=-1e-7)))
    p_top = top_logprobs.float()
    rest = rest_logprob.float()
    per_position = (p_top.exp() * (p_top - q_top)).sum(-1)
    per_position = per_position + torch.where(rest > float("-inf"), rest.exp() * (rest - q_rest), 0.0)
    return predicting_positions_mean(per_position, labels)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of the values, shapes and dtypes of ``model``'s parameters and buffers, in module order, leaving out
    mask-adapter tensors (names with ``maskllm_``): the same for the bare base model and for it inside a
    ``PeftModel`` with any mask adapters. Hashes every byte (about a second per 500 MB)."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if PREFIX in name:
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return digest.hexdigest()


def _dataset_fingerprint(dataset: Dataset) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for column in _INPUT_COLUMNS:
        if column not in dataset.column_names:
            continue
        digest.update(column.encode())
        for row in dataset.with_format("numpy")[column]:
            row = np.asarray(row, dtype=np.int64)
            digest.update(f"{row.shape};".encode())
            digest.update(row.tobytes())
    return digest.hexdigest()


def add_teacher_outputs(
    model: torch.nn.Module,
    dataset: Dataset,
    top_k: int = 64,
    batch_size: int = 8,
    cache: Optional[str | os.PathLike] = None,
    show_progress: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Dataset:
    """``dataset`` with the dense model's top-``k`` next-token distribution of every example as
    :data:`TEACHER_COLUMNS`, computed once and cached on disk.

    Args:
        model: the dense model, or a ``PeftModel`` whose adapters are disabled for the teacher (the base is the
            teacher, as in :class:`~sparse_peft.training.DenseDistillationTrainer`). Run in eval mode, without
            autocast, in the model's own dtype, on its device.
        dataset: examples with ``input_ids`` (and optionally ``attention_mask``) of one length, e.g.
            :func:`~sparse_peft.training.text_windows`.
        top_k: tokens kept per position; the cache takes ``6 * top_k + 4`` bytes per token (388 B for 64).
        batch_size: examples per teacher forward.
        cache: the cache folder (default ``teacher/`` under :func:`~sparse_peft.utils.cache_dir`); each entry is a
            sub-folder named by the content hash of the base weights, the examples and ``top_k``.
        show_progress: a progress bar over the teacher's batches while an entry is computed.
        autocast_dtype: run the teacher under ``torch.autocast`` in this dtype (``torch.bfloat16`` /
            ``torch.float16``), as a per-step teacher forward does under ``Trainer(bf16=True)`` / ``fp16=True``:
            half-precision matmuls, much faster where they are native. ``None``: the model's own dtype. Part of the
            cache key.

    Returns:
        A new ``Dataset`` (memory-mapped from the cache) with the original columns and the three teacher columns.
    """
    for column in TEACHER_COLUMNS:
        if column in dataset.column_names:
            raise ValueError(f"dataset already has a {column!r} column: its teacher outputs are already added.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it first.")
    lengths = {len(ids) for ids in dataset["input_ids"]}
    if len(lengths) > 1:
        raise ValueError(
            f"add_teacher_outputs needs examples of one length (these have {min(lengths)} to {max(lengths)} tokens), "
            "because Trainer's collator would pad the teacher columns differently from input_ids. Cut the text "
            "into equal windows (sparse_peft.training.text_windows), or distil without a teacher cache."
        )
    precision = "" if autocast_dtype is None else f":autocast-{str(autocast_dtype).removeprefix('torch.')}"
    key = hashlib.blake2b(
        f"{_FORMAT}:{model_fingerprint(model)}:{_dataset_fingerprint(dataset)}:{top_k}{precision}".encode(),
        digest_size=16,
    ).hexdigest()
    folder = Path(cache if cache is not None else cache_dir() / "teacher") / key
    if not folder.is_dir():
        try:
            with atomic_folder(folder) as scratch:
                _teacher_columns(model, dataset, top_k, batch_size, show_progress, autocast_dtype).save_to_disk(scratch)
        except OSError:
            if not folder.is_dir():  # not another process that finished the same entry first
                raise
    try:
        teacher = load_from_disk(str(folder))
    except (OSError, ValueError) as error:  # e.g. a file of the entry deleted by hand
        raise ValueError(f"teacher cache {folder} cannot be read ({error}): delete that folder and it is computed "
                         "again.") from error
    if len(teacher) != len(dataset):
        raise ValueError(f"teacher cache {folder} holds {len(teacher)} examples, not {len(dataset)}: delete it.")
    return concatenate_datasets([dataset, teacher], axis=1)


def _teacher_columns(
    model: torch.nn.Module,
    dataset: Dataset,
    top_k: int,
    batch_size: int,
    show_progress: bool,
    autocast_dtype: Optional[torch.dtype],
) -> Dataset:
    """The three teacher columns of ``dataset`` (``[len(dataset)]`` rows) from batched no-grad forwards."""
    device = next(model.parameters()).device
    disable = getattr(model, "disable_adapter", None)
    was_training = model.training
    model.eval()
    columns: dict[str, list] = {column: [] for column in TEACHER_COLUMNS}
    inputs = dataset.with_format("torch", columns=[c for c in _INPUT_COLUMNS if c in dataset.column_names])
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"teacher top-{top_k}", unit="batch",
                          disable=not show_progress):
            batch = {name: value.to(device) for name, value in inputs[start : start + batch_size].items()}
            with (
                torch.no_grad(),
                disable() if disable is not None else nullcontext(),
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
            ):
                logits = model(**batch).logits
            for column, value in zip(TEACHER_COLUMNS, teacher_top_k(logits, top_k)):
                columns[column].extend(value.cpu().numpy())
    finally:
        model.train(was_training)
    return Dataset.from_dict(columns)
