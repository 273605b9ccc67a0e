"""Downstream tasks over the shipped data: causal-LM domains and classification tasks, with their prompts and splits.

* A causal-LM task (:class:`LMTask`) is training text and held-out text (whole documents that are never trained on),
  scored by perplexity.
* A classification task (:class:`ClassificationTask`) is a training table and an evaluation table (the dev / test
  split). Each input becomes a prompt such as ``"Review: <text>\\nSentiment:"``; as a language-modelling task the
  answer is the label word after the prompt (``" positive"``), as ``task_type="SEQ_CLS"`` it is the class index of a
  trained head reading the same prompt.

:func:`label_word_examples` and :func:`classification_examples` tokenise the same prompts for the two objectives,
and :func:`examples_for_budget` takes the training examples that make up a task-token budget.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from datasets import Dataset

from .data import assets_dir, load_table, load_texts

#: Label words of the sentiment tasks (class 0, class 1) and of AG News (its four topics, in label order).
SENTIMENT_WORDS = ("negative", "positive")
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
AG_NEWS_WORDS = ("World", "Sports", "Business", "Technology")
#: Words of an input kept in its prompt (the rest is cut), so that every example fits a short training sequence.
DEFAULT_MAX_WORDS = 64


def sentiment_prompt(text: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """``"Review: <the first max_words words>\\nSentiment:"`` (SST-2, IMDB)."""
    return f"Review: {' '.join(text.split()[:max_words])}\nSentiment:"


def topic_prompt(text: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """``"Article: <the first max_words words>\\nTopic:"`` (AG News)."""
    return f"Article: {' '.join(text.split()[:max_words])}\nTopic:"


def held_out_split(documents: Sequence[str], held_out: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: the last ``held_out`` fraction of the documents (at least one) is held out.

    Deterministic and at document level: no document is in both parts. Raises if fewer than two documents.
    """
    if len(documents) < 2 or not 0 < held_out < 1:
        raise ValueError(f"Need >= 2 documents and 0 < held_out < 1, got {len(documents)} and {held_out}.")
    cut = min(len(documents) - 1, max(1, int(round((1 - held_out) * len(documents)))))
    return list(documents[:cut]), list(documents[cut:])


@dataclass
class LMTask:
    """A causal-LM domain: ``train`` documents and ``held_out`` documents (never trained on), scored by perplexity."""

    name: str
    train: list[str]
    held_out: list[str]
    metric: str = "ppl"


@dataclass
class ClassificationTask:
    """A classification task: inputs and class indices of the training and evaluation splits.

    ``prompt(text)`` formats an input; ``label_words[c]`` is the word that answers class ``c`` after the prompt.
    """

    name: str
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_words: tuple[str, ...]
    prompt: Callable[[str], str]
    metric: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def train_prompts(self) -> list[str]:
        return [self.prompt(t) for t in self.train_texts]

    def eval_prompts(self) -> list[str]:
        return [self.prompt(t) for t in self.eval_texts]

    def train_text(self) -> list[str]:
        """The training examples as text: each prompt followed by its label word (the label-word LM text)."""
        return [f"{p} {self.label_words[c]}" for p, c in zip(self.train_prompts(), self.train_labels)]


def _asset(*parts: str) -> str:
    return os.path.join(assets_dir(), *parts)


def _class_indices(values: Sequence, classes: Sequence[str]) -> list[int]:
    """Class indices of ``values``: already ints, or names in ``classes`` (case-insensitive)."""
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    return [v if isinstance(v, int) else lookup[str(v).strip().lower()] for v in values]


def _table(source: str, split: str, text: str, label: str, classes: Sequence[str], column_names=None, seed=0):
    table = load_table(source, split=split, column_names=column_names).shuffle(seed=seed)
    return list(table[text]), _class_indices(table[label], classes)


#: Names of the tasks :func:`load_task` knows: causal-LM domains first, then classification.
LM_TASKS = ("tinystories", "agnews_text", "imdb_text")
CLASSIFICATION_TASKS = ("sst2", "agnews", "imdb")


def load_task(name: str, max_words: int = DEFAULT_MAX_WORDS, held_out: float = 0.1) -> LMTask | ClassificationTask:
    """One task of the shipped data (see :data:`LM_TASKS`, :data:`CLASSIFICATION_TASKS`).

    * ``tinystories``: the shipped TinyStories paragraphs; the last ``held_out`` fraction is held out.
    * ``agnews_text`` / ``imdb_text``: AG News articles (train on the dev file, held out: the test file) / IMDB
      reviews (train.csv / test.csv) as plain text.
    * ``sst2``: train.tsv / dev.tsv; ``agnews``: dev.tsv / test.tsv; ``imdb``: train.csv / test.csv. Each table is
      shuffled with seed 0 (the AG News and IMDB files are not in random order); prompts keep ``max_words`` words.
    """
    agnews_columns = ["text", "label"]
    if name == "tinystories":
        return LMTask(name, *held_out_split(load_texts("tinystories", split="train"), held_out))
    if name == "agnews_text":  # header-less files: the columns are named here, as for the classification task
        return LMTask(name, *(list(load_table(_asset("ag_news", f), column_names=agnews_columns)["text"])
                              for f in ("dev.tsv", "test.tsv")))
    if name == "imdb_text":
        return LMTask(name, load_texts(_asset("imdb_small", "train.csv"), text_column="review"),
                      load_texts(_asset("imdb_small", "test.csv"), text_column="review"))

    def words(fn):
        return lambda text: fn(text, max_words)

    if name == "sst2":
        train = _table(_asset("sst2", "train.tsv"), "train", "sentence", "label", SENTIMENT_WORDS)
        dev = _table(_asset("sst2", "dev.tsv"), "train", "sentence", "label", SENTIMENT_WORDS)
        return ClassificationTask(name, *train, *dev, SENTIMENT_WORDS, words(sentiment_prompt))
    if name == "agnews":
        train = _table(_asset("ag_news", "dev.tsv"), "train", "text", "label", AG_NEWS_CLASSES, agnews_columns)
        test = _table(_asset("ag_news", "test.tsv"), "train", "text", "label", AG_NEWS_CLASSES, agnews_columns)
        return ClassificationTask(name, *train, *test, AG_NEWS_WORDS, words(topic_prompt))
    if name == "imdb":
        train = _table(_asset("imdb_small", "train.csv"), "train", "review", "sentiment", SENTIMENT_WORDS)
        test = _table(_asset("imdb_small", "test.csv"), "train", "review", "sentiment", SENTIMENT_WORDS)
        return ClassificationTask(name, *train, *test, SENTIMENT_WORDS, words(sentiment_prompt))
    raise ValueError(f"Unknown task {name!r}; choose from {', '.join(LM_TASKS + CLASSIFICATION_TASKS)}.")


def _check_lengths(prompts: Sequence[str], labels: Sequence[int]) -> None:
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels; pass one label per prompt.")


def label_word_examples(
    prompts: Sequence[str], labels: Sequence[int], label_words: Sequence[str], tokenizer, max_length: int
) -> Dataset:
    """Per example: the prompt's tokens then the first token of ``" " + label word`` (the token that
    :func:`~sparse_peft.evaluation.label_word_predictions` scores); ``labels`` are -100 except at that token, so the
    LM loss is the label word's alone. A prompt longer than ``max_length - 1`` tokens is cut to that length before
    the label word is appended. Columns ``input_ids``, ``labels`` (lists of
    different lengths; pad with ``DataCollatorForSeq2Seq``).
    """
    _check_lengths(prompts, labels)
    answer = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in label_words]
    input_ids, targets = [], []
    for ids, label in zip(tokenizer(list(prompts), verbose=False)["input_ids"], labels):
        ids = ids[: max_length - 1] + [answer[label]]
        input_ids.append(ids)
        targets.append([-100] * (len(ids) - 1) + [answer[label]])
    return Dataset.from_dict({"input_ids": input_ids, "labels": targets})


def classification_examples(prompts: Sequence[str], labels: Sequence[int], tokenizer, max_length: int) -> Dataset:
    """Per example: the prompt's tokens (cut to ``max_length``) and its class index, for ``task_type="SEQ_CLS"``.
    Columns ``input_ids`` (lists of different lengths; pad with ``DataCollatorWithPadding``) and ``labels``."""
    _check_lengths(prompts, labels)
    ids = [x[:max_length] for x in tokenizer(list(prompts), verbose=False)["input_ids"]]
    return Dataset.from_dict({"input_ids": ids, "labels": list(labels)})


def examples_for_budget(examples: Dataset, budget: int, tokens_per_step: int) -> dict:
    """The training examples and step shape for a budget of ``budget`` task tokens.

    A step holds about ``tokens_per_step`` tokens, i.e. ``round(tokens_per_step / mean example length)`` examples,
    so that causal-LM windows and short classification examples of one budget take about the same number of steps.
    The first examples whose tokens reach ``budget`` are taken, rounded up to whole steps. If all the examples hold
    fewer tokens than that, all are taken and the steps go over them again (``passes`` > 1).

    Returns ``{"dataset", "examples_per_step", "steps", "tokens" (tokens the steps see), "passes"}``.
    """
    lengths = [len(ids) for ids in examples["input_ids"]]
    if not lengths or budget < 1 or tokens_per_step < 1:
        raise ValueError(f"Need examples and a positive budget and step size, got {len(lengths)} examples, budget "
                         f"{budget}, {tokens_per_step} tokens per step.")
    total, count = 0, 0
    while count < len(lengths) and total < budget:
        total += lengths[count]
        count += 1
    mean = total / count
    per_step = max(1, round(tokens_per_step / mean))
    needed = count if total >= budget else math.ceil(budget / mean)  # examples the budget asks for
    steps = math.ceil(needed / per_step)
    count = min(len(lengths), steps * per_step)
    seen = steps * per_step
    tokens = sum(lengths[:count]) if seen <= count else round(seen * sum(lengths[:count]) / count)
    return {"dataset": examples.select(range(count)), "examples_per_step": per_step, "steps": steps,
            "tokens": tokens, "passes": round(seen / count, 3)}
