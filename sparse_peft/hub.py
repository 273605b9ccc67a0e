"""Sharing mask adapters on the Hugging Face Hub: push with a sparse-peft model card, download with clear errors.

:func:`push_mask_adapter` uploads ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md``: a
``huggingface_hub.ModelCard`` rendered from the Jinja2 template ``hub_cards/mask_adapter.md``, whose
``ModelCardData`` front matter has ``library_name: peft``, ``base_model``, the tags the Hub uses for PEFT adapters
and, for ``EvalResult`` s passed in, the ``model-index`` the Hub shows as evaluation results.
Use it instead of ``peft_model.push_to_hub``: with transformers 5.x that call replaces the card of a new repo with
transformers' generic one (``library_name: transformers``, no ``base_model``).

The Hub endpoint is ``huggingface_hub``'s (``HF_ENDPOINT``, default https://huggingface.co); the token is the one
passed, else ``HF_TOKEN`` / ``hf auth login``'s. Pulling needs nothing from this module:
``PeftModel.from_pretrained(base, "user/repo")`` and ``MaskConfig(prior="user/repo")`` download the adapter.

A task adapter delta-coded against a *local* general mask cannot be pushed until it refers to a copy others can
download: push the general mask, then :func:`repoint_general_mask` rewrites the task adapter's reference to that
Hub repo (after checking the Hub copy is the same file), and the task adapter can be pushed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch.nn as nn
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .adapter_io import load_mask_adapter
from .constants import ONE_SHOT_PRIORS, PEFT_TYPE_VALUE, SHIPPED_BASE_SOURCE
from .stats import LayerMaskStats, format_stats, mask_stats
from .utils import atomic_write

#: Model-card template used by :func:`push_mask_adapter` (a Jinja2 file in ``hub_cards/``).
DEFAULT_TEMPLATE = "mask_adapter.md"
#: The files of a mask adapter that are uploaded (PEFT's names), besides the rendered ``README.md``.
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
# Hub pipeline tag and transformers auto class per PEFT task_type (the card's metadata and load snippet).
_TASKS = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # namespace/name
_MODEL_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[\w.-]+$")  # also legacy ids without namespace ("gpt2")


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """Path of a model-card template: ``sparse_peft/hub_cards/<name>``.

    ``hub_cards/`` at the repository root is the source of truth; ``sparse_peft/hub_cards`` is a symlink to it,
    which wheels and sdists store as real files (package data).
    """
    path = Path(__file__).resolve().parent / "hub_cards" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Model-card template {name!r} not found in {path.parent}: pass the name of a file there, or reinstall "
            "sparse-peft if the folder is missing."
        )
    return path


def render_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    base_model: str | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> str:
    """The ``README.md`` text for the mask adapter saved in ``folder``, to be pushed to ``repo_id``.

    A ``huggingface_hub.ModelCard`` rendered from the Jinja2 template ``hub_cards/<template>`` with
    ``ModelCardData`` front matter. ``base_model`` (a Hub model id) defaults to the adapter's
    ``base_model_name_or_path``. ``eval_results`` (``huggingface_hub.EvalResult`` s, e.g. ``task_type=
    "text-generation", dataset_type="wikitext", metric_type="perplexity"``) go into the front matter's
    ``model-index``, which the Hub shows as evaluation results, and into a table; ``metrics`` maps further metric
    names to values (e.g. ``{"wikitext-2 PPL, dense": 5.12}``), shown in a table as given, units and all. The
    sparsity section is computed from the adapter file itself with :func:`~sparse_peft.mask_stats`.
    """
    metric_rows = _metric_rows(metrics)
    eval_results = _check_eval_results(eval_results)
    adapter = load_mask_adapter(folder)
    config = adapter.config
    base = _base_model_id(base_model if base_model is not None else config.get("base_model_name_or_path"))
    n, m = adapter.n, adapter.m
    stats = mask_stats(adapter)
    pipeline_tag, auto_class = _TASKS.get(config.get("task_type") or "", (None, "AutoModel"))
    tags = ["peft", "sparse-peft", "maskllm", "n:m-sparsity", f"{n}:{m}-sparsity", "transformers",
            f"base_model:adapter:{base}"]
    card_data = ModelCardData(
        library_name="peft", base_model=base, pipeline_tag=pipeline_tag, tags=tags,
        eval_results=eval_results or None, model_name=repo_id.split("/")[-1] if eval_results else None,
    )
    num_weights = sum(row.shape[0] * row.shape[1] for row in stats)
    file_bytes = os.path.getsize(Path(folder) / ADAPTER_FILES[1])
    prior = config.get("prior")
    delta = None
    if config.get("save_delta") and config.get("prior_sha256"):
        delta = {"prior": prior, "revision": config.get("prior_revision"), "sha256": config["prior_sha256"]}
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(template)),
        base_model=base,
        repo_id=repo_id,
        n=n,
        m=m,
        n_m=f"{n}:{m}",
        bits_per_group=math.ceil(math.log2(math.comb(m, n))),
        targets=_targets(config.get("target_modules")),
        num_layers=len(stats),
        num_weights=f"{num_weights:,}",
        prior=_prior(prior),
        delta=delta,
        file_bytes=f"{file_bytes:,}",
        bits_per_weight=f"{8 * file_bytes / num_weights:.3f}",
        valid_layers=sum(row.valid_n_m for row in stats),
        sparsity=f"{_overall_sparsity(stats):.4f}",
        layer_table=format_stats(stats),
        eval_rows=[_eval_row(result) for result in eval_results],
        metric_rows=metric_rows,
        auto_class=auto_class,
        shipped=SHIPPED_BASE_SOURCE if base == SHIPPED_BASE_SOURCE["hub_id"] else None,
    )
    return str(card)


def push_mask_adapter(
    model_or_folder: Union[nn.Module, str, os.PathLike],
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    base_model: str | None = None,
    adapter_name: str = "default",
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload sparse-peft mask adapter",
    template: str = DEFAULT_TEMPLATE,
) -> str:
    """Upload a mask adapter and its model card to the Hub model repo ``repo_id`` (created if missing).

    ``model_or_folder`` is a ``PeftModel`` holding mask adapter ``adapter_name`` (saved to a temporary folder
    first) or the folder of a saved mask adapter, which is only read. One commit adds ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``README.md`` (:func:`render_card` with ``metrics``, ``eval_results`` and
    ``base_model``);
    other files already in the repo stay. ``private`` applies when the repo is created.

    Returns the commit URL (a ``huggingface_hub.CommitInfo``, which is a ``str``). Raises ``ConnectionError`` if
    the Hub cannot be reached, ``PermissionError`` if the token may not write to ``repo_id``; a failed push
    changes no local file.
    """
    if not (isinstance(repo_id, str) and _REPO_ID.match(repo_id)):
        raise ValueError(
            f"repo_id must be 'namespace/name' (a Hub user or organisation and a repo name), got {repo_id!r}."
        )
    _metric_rows(metrics)  # validate before any network call
    _check_eval_results(eval_results)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sparse-peft-push-") as staging:
        _stage_adapter(model_or_folder, adapter_name, staging)
        card = render_card(
            staging, repo_id, metrics=metrics, eval_results=eval_results, base_model=base_model, template=template
        )
        atomic_write(os.path.join(staging, "README.md"), lambda f: f.write(card.encode("utf-8")))
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(staging, name))
            for name in (*ADAPTER_FILES, "README.md")
        ]
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            return api.create_commit(repo_id, operations, commit_message=commit_message)
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            where = f"the Hub model repo {repo_id!r} at {api.endpoint}"
            if status in (401, 403):
                raise PermissionError(
                    f"Not allowed to push to {where} (HTTP {status}): pass token= a write token for that namespace, "
                    "or log in with `hf auth login`. Nothing was changed locally."
                ) from err
            raise RuntimeError(
                f"Pushing the mask adapter to {where} failed: {err} Nothing was changed locally."
            ) from err
        except Exception as err:
            if not _is_network_error(err):
                raise
            raise ConnectionError(
                f"Could not reach the Hub at {api.endpoint} to push {repo_id!r} ({type(err).__name__}: {err}). "
                "Check the network and HF_ENDPOINT, then push again; nothing was changed locally."
            ) from err


def repoint_general_mask(
    task_dir: Union[str, os.PathLike], general: str, revision: str | None = None
) -> dict[str, Any]:
    """Make a delta-coded task adapter refer to another copy of its general mask, e.g. the one pushed to the Hub.

    ``general`` is a Hub repo id (read at ``revision``, default ``main``) or a local folder. Its
    ``adapter_model.safetensors`` is fetched (into the Hub cache) and must have the sha256 the task adapter recorded
    (``prior_sha256``) and the same N:M; then ``adapter_config.json`` in ``task_dir`` is rewritten in one atomic
    replace with ``prior = general`` and ``prior_revision`` = the commit the file was read at (None for a folder),
    so later loads fetch exactly that commit. The weights file is not touched.

    Returns the new config (a dict). Raises ``FileNotFoundError`` if ``task_dir`` is not a saved mask adapter or
    ``general`` cannot be found (naming the repo and the Hub endpoint), ``ValueError`` if the task adapter is not
    delta-coded or ``general`` is a different file; in every failure ``task_dir`` is left as it was.
    """
    folder = os.fspath(task_dir)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no {CONFIG_NAME}: it is not a saved mask adapter folder.")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != PEFT_TYPE_VALUE:
        raise ValueError(f"{folder!r} is a {config.get('peft_type')!r} adapter, not a sparse_peft mask adapter.")
    if not (config.get("save_delta") and config.get("prior_sha256")):
        raise ValueError(
            f"{folder!r} is not delta-coded (its adapter file holds every mask in full), so it refers to no general "
            "mask and there is nothing to re-point: push it as it is."
        )
    general = os.fspath(general)
    if revision is not None and os.path.isdir(general):
        raise ValueError(f"revision= applies to a Hub repo id; {general!r} is a local folder.")
    if not (os.path.isdir(general) or _REPO_ID.match(general)):
        raise ValueError(f"general must be a Hub repo id 'namespace/name' or a local folder, got {general!r}.")
    adapter = load_mask_adapter(general, revision)
    if adapter.sha256 != config["prior_sha256"]:
        at = f" at revision {adapter.revision}" if adapter.revision else ""
        raise ValueError(
            f"{general!r}{at} is not the general mask {folder!r} was made from: its adapter_model.safetensors has "
            f"sha256 {adapter.sha256}, the task adapter needs {config['prior_sha256']} (the general mask "
            f"{config.get('prior')!r}). Push that exact general mask folder (or pass the revision holding it); "
            f"{folder!r} was left unchanged."
        )
    if (adapter.n, adapter.m) != (int(config["n"]), int(config["m"])):
        raise ValueError(f"The general mask {general!r} is {adapter.n}:{adapter.m}, the task adapter "
                         f"{config['n']}:{config['m']}; {folder!r} was left unchanged.")
    updated = {**config, "prior": general, "prior_revision": adapter.revision}
    text = json.dumps(updated, indent=2, sort_keys=True) + "\n"
    atomic_write(config_path, lambda f: f.write(text.encode("utf-8")))
    return updated


def _stage_adapter(model_or_folder: Union[nn.Module, str, os.PathLike], adapter_name: str, staging: str) -> None:
    """Put the adapter's :data:`ADAPTER_FILES` into the empty folder ``staging`` (never writes to the source)."""
    if isinstance(model_or_folder, nn.Module):
        if adapter_name not in getattr(model_or_folder, "peft_config", {}):
            raise ValueError(
                f"The model has no adapter {adapter_name!r}; pass a PeftModel from get_peft_model / "
                "PeftModel.from_pretrained and one of its adapter names, or a saved adapter folder."
            )
        saved = os.path.join(staging, "saved")
        model_or_folder.save_pretrained(saved, selected_adapters=[adapter_name])
        source = saved if adapter_name == "default" else os.path.join(saved, adapter_name)
    else:
        source = os.fspath(model_or_folder)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"{source!r} is not a folder; pass a saved mask adapter folder or a PeftModel.")
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(source, name)):
            raise FileNotFoundError(
                f"{source!r} has no {name}: it is not a saved mask adapter (save_pretrained writes it)."
            )
        shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))
    with open(os.path.join(staging, ADAPTER_FILES[0])) as f:
        config = json.load(f)
    prior = config.get("prior")
    if config.get("save_delta") and config.get("prior_sha256") and not _is_hub_adapter(prior):
        raise ValueError(
            f"{source!r} is delta-coded against the general mask {prior!r}, a local folder that users of the Hub repo "
            "cannot download. Push the general mask first, then re-point this adapter at it with "
            "`sparse-peft repoint TASK_DIR --general user/general-repo` (or sparse_peft.hub.repoint_general_mask), "
            "which checks that the Hub copy is the same file, and push again."
        )


def _base_model_id(name: str | None) -> str:
    """``name`` if it is a Hub model id; otherwise a ValueError asking for ``base_model=``."""
    if not name or os.path.isabs(name) or os.path.exists(name) or not _MODEL_ID.match(name):
        raise ValueError(
            f"The adapter's base model {name!r} is not a Hub model id, so the card cannot link it "
            "and the Hub would reject it as base_model. Pass base_model='namespace/name' (the Hub id of the base)."
        )
    return name


def _targets(targets: Any) -> str:
    if isinstance(targets, (list, tuple, set)):
        return ", ".join(f"`{t}`" for t in sorted(targets))
    return f"`{targets}`" if targets else "the defaults for this architecture"


def _prior(prior: str | None) -> str:
    if prior is None:
        return "none (random initial logits)"
    if prior in ONE_SHOT_PRIORS:
        return f"one-shot `{prior}` mask"
    if _is_hub_adapter(prior):
        return f"mask adapter [`{prior}`](/{prior}) (transfer from a general mask)"
    return f"local mask adapter `{os.path.basename(os.path.normpath(prior))}` (not on the Hub)"


def _is_hub_adapter(prior: str | None) -> bool:
    """Whether a config's ``prior`` names a mask adapter on the Hub (a repo id that is not a local path)."""
    return bool(prior) and _REPO_ID.match(prior) is not None and not os.path.exists(prior)


def _overall_sparsity(stats: list[LayerMaskStats]) -> float:
    weights = [row.shape[0] * row.shape[1] for row in stats]
    return sum(row.sparsity * w for row, w in zip(stats, weights)) / sum(weights)


def _metric_rows(metrics: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``metrics`` as Markdown table cells ``(name, value)``; floats with 4 significant digits, the rest as is."""
    if not metrics:
        return []
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping {{name: value}}, got {type(metrics).__name__}.")
    rows = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"metrics[{name!r}] is {value!r}; metric values must be numbers or strings.")
        rows.append((_cell(name), _cell(value)))
    return rows


def _check_eval_results(eval_results: Sequence[EvalResult] | None) -> list[EvalResult]:
    """``eval_results`` as a list, or a TypeError naming the entry that is not a ``huggingface_hub.EvalResult``."""
    if eval_results is None:
        return []
    if isinstance(eval_results, EvalResult):
        return [eval_results]
    if isinstance(eval_results, (str, Mapping)) or not isinstance(eval_results, Sequence):
        raise TypeError(
            f"eval_results must be a list of huggingface_hub.EvalResult, got {type(eval_results).__name__}."
        )
    for i, result in enumerate(eval_results):
        if not isinstance(result, EvalResult):
            raise TypeError(
                f"eval_results[{i}] is {result!r}; pass huggingface_hub.EvalResult(task_type=..., dataset_type=..., "
                "dataset_name=..., metric_type=..., metric_value=...), or put free-form values in metrics=."
            )
    return list(eval_results)


def _eval_row(result: EvalResult) -> tuple[str, ...]:
    """Table cells (task, dataset, split, metric, value) of one evaluation result."""
    dataset = result.dataset_name + (f" ({result.dataset_config})" if result.dataset_config else "")
    return tuple(_cell(cell) for cell in (
        result.task_name or result.task_type, dataset, result.dataset_split or "-",
        result.metric_name or result.metric_type, result.metric_value,
    ))


def _cell(value: Any) -> str:
    """A Markdown table cell: floats with 4 significant digits, ``|`` replaced so the table stays intact."""
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return shown.replace("|", "/")


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` means the server could not be reached.

    ``OSError`` covers ``requests``' connection errors; ``TransportError`` is the base of the network errors of
    ``httpx`` and its fork ``httpx2``, which newer ``huggingface_hub`` releases use.
    """
    return isinstance(err, OSError) or any(cls.__name__ == "TransportError" for cls in type(err).__mro__)
