"""Every task of sparse_peft.tasks loads from the shipped data, with the rows and columns of its files."""

import csv

import pytest

from sparse_peft.data import assets_dir
from sparse_peft.tasks import CLASSIFICATION_TASKS, LM_TASKS, ClassificationTask, LMTask, load_task


def _first_row(*parts):
    with open(f"{assets_dir()}/{'/'.join(parts)}", newline="") as f:
        return next(csv.reader(f, delimiter="\t" if parts[-1].endswith(".tsv") else ","))


@pytest.mark.parametrize("name", LM_TASKS)
def test_lm_tasks_hold_disjoint_nonempty_text(name):
    task = load_task(name)
    assert isinstance(task, LMTask) and task.train and task.held_out
    assert all(isinstance(t, str) for t in task.train + task.held_out)
    assert sum(map(len, task.train)) > 100_000 and sum(map(len, task.held_out)) > 10_000
    documents = {t for t in task.train if t.strip()}
    held_out = [t for t in task.held_out if t.strip()]
    # the corpora repeat a few short lines (dialogue, wire-service items) across their files; no more
    assert sum(t in documents for t in held_out) < 0.05 * len(held_out)


def test_agnews_text_keeps_the_first_row_of_its_header_less_files():
    task = load_task("agnews_text")
    assert task.train[0] == _first_row("ag_news", "dev.tsv")[0]
    assert task.held_out[0] == _first_row("ag_news", "test.tsv")[0]
    assert task.held_out[0].startswith("Unions representing workers")


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_tasks_have_one_label_per_input_in_range(name):
    task = load_task(name)
    assert isinstance(task, ClassificationTask)
    for texts, labels in ((task.train_texts, task.train_labels), (task.eval_texts, task.eval_labels)):
        assert len(texts) == len(labels) > 0
        assert set(labels) == set(range(len(task.label_words)))
    assert task.prompt(task.eval_texts[0]).strip()
