"""Zero-shot accuracy with lm-evaluation-harness, for plain models, mask adapters and merged models.

:func:`zero_shot` wraps an already-built model in lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate`` on any
task lm-eval knows (its built-in tasks load their data from the Hub as lm-eval ships them), on the local tasks
shipped in ``sparse_peft/lm_eval_tasks`` (``sst2_local``, ``agnews_local``, ``imdb_local``: multiple choice, the
log-likelihood of each label word after the prompt) and on the YAML tasks in the user's own ``include_path`` folders.

The shipped YAMLs name their data files relative to the assets folder (:func:`sparse_peft.data.assets_dir`:
``$SPARSE_PEFT_ASSETS``, else ``shared/assets`` beside the checkout, or the ``assets`` argument); each run renders
them into a temporary folder with absolute paths, which lm-eval then reads like any include folder.

``lm_eval`` is an optional dependency: ``pip install "sparse-peft[eval]"``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .data import assets_dir
from .utils import atomic_write

#: The task YAMLs shipped with the package (data files relative to the assets folder).
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
INSTALL_HINT = 'pip install "sparse-peft[eval]"'


def _lm_eval():
    """``(simple_evaluate, HFLM, TaskManager)``, or a one-line ImportError naming the extra."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(f"Zero-shot evaluation needs lm-eval: {INSTALL_HINT}") from None
    return simple_evaluate, HFLM, TaskManager


def shipped_tasks() -> list[str]:
    """Names of the local tasks shipped with the package."""
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def _data_files(config: Mapping) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    files = files.values() if isinstance(files, Mapping) else [files]
    return [f for entry in files for f in ([entry] if isinstance(entry, str) else entry)]


def render_shipped_tasks(folder: str | os.PathLike, assets: Optional[str | os.PathLike] = None) -> dict[str, list]:
    """Write the shipped task YAMLs into ``folder`` with their data files made absolute under ``assets``.

    Returns ``{task name: [absolute data files]}``. ``assets`` defaults to :func:`sparse_peft.data.assets_dir`.
    """
    import yaml

    root = Path(assets) if assets is not None else assets_dir()
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        if isinstance(files, Mapping):
            config["dataset_kwargs"]["data_files"] = {k: _absolute(root, v) for k, v in files.items()}
        else:
            config["dataset_kwargs"]["data_files"] = _absolute(root, files)
        Path(folder, path.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        tasks[config["task"]] = _data_files(config)
    return tasks


def _absolute(root: Path, files):
    return str(root / files) if isinstance(files, str) else [str(root / f) for f in files]


def lm_eval_results(
    model: torch.nn.Module, tokenizer, tasks: Sequence[str], *, batch_size: int = 8,
    include_path: Optional[str | os.PathLike | Sequence[str | os.PathLike]] = None,
    assets: Optional[str | os.PathLike] = None, **simple_evaluate_kwargs: Any,
) -> dict:
    """lm-eval's own result dict of ``simple_evaluate`` (``results``, ``n-samples``, ``configs``, and ``samples``
    with ``log_samples=True``); arguments as :func:`zero_shot`; ``num_fewshot`` (default 0), ``limit``,
    ``log_samples`` and the rest go to ``simple_evaluate``.
    """
    simple_evaluate_kwargs.setdefault("num_fewshot", 0)
    simple_evaluate, HFLM, TaskManager = _lm_eval()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    user_paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    )
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="sparse_peft_tasks_") as rendered:
        shipped = render_shipped_tasks(rendered, assets)
        for task in tasks:
            missing = [f for f in shipped.get(task, []) if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(
                    f"The data of the shipped task {task!r} is missing ({missing[0]}). Set SPARSE_PEFT_ASSETS (or "
                    "pass assets=...) to the folder holding the shipped assets."
                )
        # User folders come after the shipped one: lm-eval lets later paths override earlier ones. lm-eval's own
        # task index (~8 s to build) is only added when a task is not found in these folders.
        paths = [rendered, *map(str, user_paths)]
        task_manager = TaskManager(include_path=paths, include_defaults=False)
        if not set(tasks) <= set(task_manager.all_tasks):
            task_manager = TaskManager(include_path=paths)
        # simple_evaluate seeds the global RNGs; give the caller's streams back afterwards.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda_devices):
                model.eval()  # mask adapters: the hard mask (HFLM calls eval() too)
                # A copy: HFLM sets a pad token on the tokenizer it is given.
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
                return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, **simple_evaluate_kwargs)
        finally:
            model.train(was_training)
            random.setstate(py_state)
            np.random.set_state(np_state)


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: Optional[int] = 0,
    limit: Optional[int | float] = None,
    batch_size: int = 8,
    include_path: Optional[str | os.PathLike | Sequence[str | os.PathLike]] = None,
    assets: Optional[str | os.PathLike] = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, dict]:
    """Zero-shot (or few-shot) accuracy of a causal LM on lm-evaluation-harness tasks.

    ``model`` is a plain ``transformers`` model, a ``PeftModel`` with a mask adapter (evaluated in eval mode, i.e.
    with its hard mask) or a merged model; its train/eval mode is restored afterwards, and so are the global
    ``random`` / numpy / torch RNG states that ``simple_evaluate`` seeds.

    Args:
        tasks: lm-eval task (or group) names: built-in ones, the shipped local tasks (:func:`shipped_tasks`) or
            tasks defined in ``include_path``.
        num_fewshot: in-context examples; ``None`` keeps each task's own default.
        limit: score only the first ``limit`` documents of each task (a fraction if < 1).
        batch_size: requests per forward pass.
        include_path: a folder (or folders) of the user's own task YAMLs, passed to lm-eval's ``TaskManager``.
        assets: the folder holding the shipped task data (default :func:`sparse_peft.data.assets_dir`).
        **simple_evaluate_kwargs: passed to ``lm_eval.simple_evaluate`` (e.g. ``bootstrap_iters``).

    Returns:
        ``{task: {metric: value, metric + "_stderr": value, "samples": documents scored}}`` for every task and
        group in lm-eval's results; metrics of a filter other than ``none`` keep it as ``"metric,filter"``.
    """
    raw = lm_eval_results(
        model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
        include_path=include_path, assets=assets, **simple_evaluate_kwargs,
    )
    return summarize(raw)


def summarize(raw: Mapping) -> dict[str, dict]:
    """``{task: {metric: value, ..., "samples": n}}`` from lm-eval's result dict (see :func:`zero_shot`)."""
    summary = {}
    for section in ("results", "groups"):
        for task, metrics in (raw.get(section) or {}).items():
            row = summary.setdefault(task, {})
            for key, value in metrics.items():
                if key in ("alias", "name", "sample_len", "sample_count"):
                    continue
                name = key[: -len(",none")] if key.endswith(",none") else key
                row[name] = float(value) if isinstance(value, (int, float, np.number)) else None
            samples = (raw.get("n-samples") or {}).get(task)
            if samples is not None:
                row["samples"] = int(samples["effective"])
    return summary


def zero_shot_table(
    rows: Mapping[str, Mapping[str, Mapping]],
    *,
    metric: str = "acc",
    ppl: Optional[Mapping[str, float]] = None,
) -> str:
    """A Markdown table: one row per model (``rows``: name -> :func:`zero_shot` result), one column per task with
    ``metric`` in percent ± its standard error, the scored documents per task in the header (per cell where rows
    differ), and a ``PPL`` column when ``ppl`` (name -> perplexity) is given.
    """
    tasks = list(dict.fromkeys(task for result in rows.values() for task in result))
    header = ["model"]
    for task in tasks:
        counts = {result[task].get("samples") for result in rows.values() if task in result}
        header.append(f"{task} {metric} % (n={counts.pop()})" if len(counts) == 1 and None not in counts
                      else f"{task} {metric} %")
    if ppl is not None:
        header.append("PPL")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in rows.items():
        cells = [name]
        for column, task in zip(header[1:], tasks):
            scores = result.get(task)
            value = None if scores is None else scores.get(metric)
            if value is None:
                cells.append("–")
                continue
            cell = f"{100 * value:.1f}"
            stderr = scores.get(f"{metric}_stderr")
            if stderr is not None:
                cell += f" ± {100 * stderr:.1f}"
            if "(n=" not in column and scores.get("samples") is not None:
                cell += f" (n={scores['samples']})"
            cells.append(cell)
        if ppl is not None:
            cells.append(f"{ppl[name]:.2f}" if ppl.get(name) is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_zero_shot_json(path: str | os.PathLike, rows: Mapping[str, Any], **settings: Any) -> None:
    """Write ``{"settings": settings, "rows": rows}`` as JSON to ``path`` all-or-nothing (parent folders made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"settings": settings, "rows": rows}
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))
