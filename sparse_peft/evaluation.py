"""Evaluation: the papers' perplexity protocol, label-word and sequence-classification predictions, and ``evaluate``
metrics.

All functions take a plain ``transformers`` model, a ``PeftModel`` with a mask adapter (evaluated in eval mode,
i.e. with the hard mask) or a merged model, and restore the model's training flag afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Zero-shot accuracy with lm-evaluation-harness (optional extra `eval`); lm_eval itself is imported on first use.
from .zero_shot import lm_eval_results, zero_shot, zero_shot_table  # noqa: F401  (re-exported)

#: Metrics bundled with the package as ``evaluate`` modules: name -> script path.
BUNDLED_METRICS = {"accuracy": os.path.join(os.path.dirname(__file__), "metrics", "accuracy.py")}
#: Default perplexity window cap (tokens), for models whose context is longer.
MAX_DEFAULT_WINDOW = 2048


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode and no grad for the ``with`` body; yields the device of the input embeddings."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model.get_input_embeddings().weight.device
    finally:
        model.train(was_training)


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    window: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    show_progress: bool = True,
) -> dict:
    """Perplexity as the pruning papers measure it on Wikitext-2.

    The documents are joined with ``"\\n\\n"`` and tokenised once; the token stream is cut into non-overlapping
    windows of ``window`` tokens (the trailing partial window is dropped), each scored independently, and
    ``PPL = exp(mean NLL)`` over every predicted token (``window - 1`` per window).

    Args:
        window: tokens per window; default the model's context length, capped at :data:`MAX_DEFAULT_WINDOW`.
        max_windows: score only the first windows (a quicker, noisier estimate).
        batch_size: windows per forward pass.

    Returns:
        ``{"ppl", "nll" (mean, nats per token), "tokens" (predicted tokens), "windows", "window"}``.
    """
    if window is None:
        window = min(getattr(model.config, "max_position_embeddings", MAX_DEFAULT_WINDOW), MAX_DEFAULT_WINDOW)
    if window < 2 or batch_size < 1:
        raise ValueError(f"window must be >= 2 and batch_size >= 1, got window={window}, batch_size={batch_size}.")
    ids = torch.as_tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // window if max_windows is None else min(ids.numel() // window, max_windows)
    if count < 1:
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one window of {window}; pass a smaller window."
        )
    windows = ids[: count * window].view(count, window)
    total_nll, predicted = 0.0, 0
    with _inference(model) as device:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not show_progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            predicted += batch[:, 1:].numel()
    mean = total_nll / predicted
    return {"ppl": math.exp(mean), "nll": mean, "tokens": predicted, "windows": count, "window": window}


def label_word_predictions(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], label_words: Sequence[str], *, batch_size: int = 8
) -> list[int]:
    """Zero-shot classification with a causal LM: the label whose word the model finds likeliest after each prompt.

    Leading-space convention: pass ``label_words`` bare (``["negative", "positive"]``, no leading space) and end
    each prompt without a trailing space (``"Review: ... Sentiment:"``). The function puts the one space between
    them itself: each label is scored by the log-probability of the first token of ``" " + word`` at the position
    after the prompt, as lm-evaluation-harness scores ``target_delimiter + choice`` with its default delimiter
    ``" "`` (so the shipped lm-eval tasks and this function score the same continuations). With a BPE tokenizer
    ``" positive"`` and ``"positive"`` are different tokens, so a word given with its own leading space, or a prompt
    ending in a space, scores a different (and usually rarer) token.

    Args:
        prompts: one text per example, ending where the label word follows.
        label_words: one word per class, in class-index order, without a leading space; their first tokens after
            the space must differ (checked: ``ValueError`` otherwise).
        batch_size: prompts per forward pass (left-padded).

    Returns:
        One class index per prompt, ``int`` in ``[0, len(label_words))``.
    """
    first_tokens = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in label_words]
    if len(set(first_tokens)) != len(first_tokens):
        raise ValueError(f"The label words {list(label_words)} do not start with distinct tokens; choose other words.")
    encoded = [tokenizer(p, verbose=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    predictions = []
    with _inference(model) as device:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)  # left padding
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)  # each prompt starts at position 0
            logits = model(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False
            ).logits[:, -1]
            predictions += logits[:, first_tokens].argmax(dim=-1).tolist()
    return predictions


def load_metric(name: str):
    """An ``evaluate`` metric module: a bundled one (:data:`BUNDLED_METRICS`) or anything ``evaluate.load`` takes."""
    import evaluate

    return evaluate.load(BUNDLED_METRICS.get(name, name))


def metric_scores(
    predictions: Sequence[int], references: Sequence[int], metrics: Sequence[str] = ("accuracy",)
) -> dict:
    """``{score name: value}`` of each ``evaluate`` metric (see :func:`load_metric`) on the predictions."""
    scores = {}
    for name in metrics:
        scores.update(load_metric(name).compute(predictions=list(predictions), references=list(references)))
    return scores


def sequence_classification_predictions(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: Optional[int] = None
) -> list[int]:
    """The argmax class of a sequence-classification model (``task_type="SEQ_CLS"``) for each text.

    Texts are tokenised in batches of ``batch_size``, padded with the tokenizer's pad token (the model's
    ``config.pad_token_id`` must be the same, so that it reads the last real token) and cut to ``max_length`` tokens
    if given. Returns one class index per text.
    """
    if tokenizer.pad_token_id is None or getattr(model.config, "pad_token_id", None) != tokenizer.pad_token_id:
        raise ValueError(
            f"Batched sequence classification needs the tokenizer's pad token (id {tokenizer.pad_token_id}) to be "
            f"the model's config.pad_token_id ({getattr(model.config, 'pad_token_id', None)}). Set "
            "tokenizer.pad_token (e.g. to its eos token) and model.config.pad_token_id = tokenizer.pad_token_id."
        )
    predictions = []
    with _inference(model) as device:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=max_length is not None,
                              max_length=max_length, return_tensors="pt", verbose=False)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            predictions += logits.logits.argmax(dim=-1).tolist()
    return predictions
