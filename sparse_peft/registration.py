"""Registration of the mask method with PEFT (``import sparse_peft`` runs :func:`register`).

Registering makes PEFT build :class:`~sparse_peft.MaskModel` for a :class:`~sparse_peft.MaskConfig` and load
``adapter_config.json`` files of our PEFT type (:func:`~sparse_peft.constants.mask_peft_type`), and installs
:func:`install_atomic_adapter_writes` and :func:`install_safetensors_only_saves`.
"""

from __future__ import annotations

import functools
import warnings

import peft.peft_model
import safetensors.torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MaskConfig
from .constants import METHOD_NAME, PREFIX, mask_peft_type
from .model import MaskModel
from .utils import atomic_write


def install_atomic_adapter_writes() -> None:
    """Make ``PeftModel.save_pretrained`` write mask-adapter weights all-or-nothing (temp file + rename).

    PEFT writes ``adapter_model.safetensors`` in place with ``peft.peft_model.safe_save_file`` and has no hook for
    the writer, so a crash or a full disk mid-write would leave a truncated file where the user's previous adapter
    was. This replaces that one name in that one module (nothing else of PEFT or safetensors) by a writer that
    routes state dicts of this method, recognised by their ``.maskllm_`` keys, through
    :func:`~sparse_peft.utils.atomic_write`, and passes every other state dict to PEFT's writer unchanged. The
    bytes written are the same as PEFT's. Installing it again is a no-op.
    """
    original = peft.peft_model.safe_save_file
    if getattr(original, "_sparse_peft_atomic", False):
        return

    def safe_save_file(tensors, filename, metadata=None):
        if not any(f".{PREFIX}" in key for key in tensors):
            return original(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        atomic_write(filename, lambda f: f.write(data))

    safe_save_file._sparse_peft_atomic = True
    peft.peft_model.safe_save_file = safe_save_file


def install_safetensors_only_saves() -> None:
    """Make ``PeftModel.save_pretrained(safe_serialization=False)`` of a mask adapter write safetensors, with a warning.

    PEFT would write a pickled ``adapter_model.bin`` in place (not through :func:`install_atomic_adapter_writes`),
    a format mask adapters never use. For a ``PeftModel`` of this method the call goes on with
    ``safe_serialization=True``: the same ``adapter_model.safetensors`` a default save writes, atomically. Other
    PEFT methods are passed through unchanged. Installing it again is a no-op.
    """
    original = peft.peft_model.PeftModel.save_pretrained
    if getattr(original, "_sparse_peft_safetensors_only", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, safe_serialization: bool = True, *args, **kwargs):
        if not safe_serialization and getattr(self, "peft_type", None) == mask_peft_type():
            warnings.warn(
                "save_pretrained(safe_serialization=False): mask adapters are saved as safetensors only; writing "
                "adapter_model.safetensors (no pickled adapter_model.bin).",
                UserWarning,
                stacklevel=2,
            )
            safe_serialization = True
        return original(self, save_directory, safe_serialization, *args, **kwargs)

    save_pretrained._sparse_peft_safetensors_only = True
    peft.peft_model.PeftModel.save_pretrained = save_pretrained


def register() -> None:
    """Register config, tuner and prefix with PEFT. Safe to call again (PEFT itself raises on a second call)."""
    install_atomic_adapter_writes()
    install_safetensors_only_saves()
    peft_type = mask_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is MaskModel:
        return
    if registered is not None:
        raise RuntimeError(f"Another tuner ({registered!r}) is already registered as PEFT type {peft_type.value!r}.")
    register_peft_method(name=METHOD_NAME, config_cls=MaskConfig, model_cls=MaskModel, prefix=PREFIX)
