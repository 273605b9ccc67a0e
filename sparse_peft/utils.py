"""Small helpers without any sparse_peft dependency: atomic file and folder writes, the cache folder, byte counts for
people, ``[out, in]`` views of linear weights, and the argument parsing and settings check of the benchmark
scripts."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from peft.utils import transpose
from transformers.pytorch_utils import Conv1D


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file all-or-nothing: ``write`` fills a temp file in the same folder, which then replaces ``path``.

    The file gets the mode ``open()`` would give a new file (``0o666`` less the process umask), not the temp file's
    ``0o600``. If ``write`` raises (or the process dies), an existing file at ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_mode(0o666))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[str]:
    """Fill a folder all-or-nothing: yields a new temp folder beside ``target``, renamed to ``target`` when the block
    ends without error (with the mode a new folder gets, not ``mkdtemp``'s ``0o700``) and removed if it raises.

    The rename fails (``OSError``) if ``target`` exists and is not empty, e.g. when another process finished first;
    the temp folder is removed then too and the caller decides.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        yield scratch
        os.chmod(scratch, umask_mode(0o777))
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


#: Environment variable that moves sparse-peft's cache (dequantised models, teacher outputs).
CACHE_ENV = "SPARSE_PEFT_CACHE"


def cache_dir() -> Path:
    """sparse-peft's cache folder: ``$SPARSE_PEFT_CACHE``, else ``~/.cache/sparse_peft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_peft")


def format_bytes(num_bytes: int) -> str:
    """``num_bytes`` for people: bytes, kB or MB (powers of 1000)."""
    if num_bytes < 1000:
        return f"{num_bytes:,} bytes"
    return f"{num_bytes / 1e3:.1f} kB" if num_bytes < 1e6 else f"{num_bytes / 1e6:.1f} MB"


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: the permission bits a new file (``0o666``) or folder (``0o777``) gets."""
    umask = os.umask(0o022)  # reading the umask means setting it; it is restored at once
    os.umask(umask)
    return mode & ~umask


def fan_in_fan_out(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight ``[in, out]`` (GPT-2's ``Conv1D``) rather than ``[out, in]``
    (``nn.Linear``)."""
    return isinstance(layer, Conv1D)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` (an ``nn.Linear`` or a ``Conv1D``) as ``[out, in]``: a view that shares its storage.

    A plain tensor that follows the parameter's ``requires_grad`` and autograd (``peft.utils.transpose`` given the
    parameter itself would wrap the transpose in a new, trainable ``Parameter``).
    """
    weight = layer.weight
    return transpose(weight.view_as(weight), fan_in_fan_out(layer))


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's output layer (``get_output_embeddings()``, e.g. ``lm_head``), or None if it has none."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        return None


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse ``type``: ``"a,b,,c"`` -> ``[kind("a"), kind("b"), kind("c")]`` (empty items dropped)."""
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def check_resumed_settings(saved: dict, current: Any, keys: Iterable[str], json_path: str) -> None:
    """Raise ``ValueError`` if a saved results table (``json_path``, its ``saved`` settings dict) was measured with
    other values of ``keys`` than ``current`` (an ``argparse.Namespace``) has; the message names each as a flag."""
    differ = {k: (saved.get(k), getattr(current, k)) for k in keys if saved.get(k) != getattr(current, k)}
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"--resume: {json_path} was measured with other settings ({shown}). Pass the same values, "
                         "or write to another --output.")


def did_you_mean(name: str, known) -> str:
    """``" Did you mean 'x'?"`` for the entry of ``known`` nearest to ``name`` (``difflib``), or ``""``."""
    match = get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
