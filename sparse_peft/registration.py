"""Registration of the mask method with PEFT (``import sparse_peft`` has :func:`register` run once PEFT is imported:
:mod:`~sparse_peft.registration_hook`).

Registering makes PEFT build :class:`~sparse_peft.MaskModel` for a :class:`~sparse_peft.MaskConfig` and load
``adapter_config.json`` files of our PEFT type (:func:`~sparse_peft.config.mask_peft_type`), and installs
:func:`install_atomic_adapter_writes`, :func:`install_safetensors_only_saves` and :func:`install_mask_displays`.
"""

from __future__ import annotations

import functools
import warnings

import peft.peft_model
import safetensors.torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MaskConfig, mask_peft_type
from .constants import METHOD_NAME, PREFIX
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


def install_mask_displays() -> None:
    """Make ``PeftModel.print_trainable_parameters()`` and ``save_pretrained`` describe mask adapters truthfully.

    PEFT has no tuner hook for either, so for a ``PeftModel`` of this method only (other PEFT methods are passed
    through unchanged):

    * ``print_trainable_parameters()`` prints :meth:`~sparse_peft.MaskModel.trainable_parameters_summary` (what
      is trained: logits per mask group; what is saved: the packed mask or its delta) instead of counting the
      logits as model parameters. ``get_nb_trainable_parameters()`` keeps PEFT's counts.
    * ``save_pretrained`` writes no ``README.md``: PEFT's ``create_or_update_model_card`` would write a generic
      card full of "[More Information Needed]". An existing ``README.md`` is left as it is;
      :func:`sparse_peft.hub.render_card` renders the real card.

    Installing it again is a no-op.
    """
    peft_model_cls = peft.peft_model.PeftModel
    original_print = peft_model_cls.print_trainable_parameters
    if getattr(original_print, "_sparse_peft_display", False):
        return

    @functools.wraps(original_print)
    def print_trainable_parameters(self) -> None:
        if getattr(self, "peft_type", None) != mask_peft_type():
            return original_print(self)
        print(self.base_model.trainable_parameters_summary())

    original_card = peft_model_cls.create_or_update_model_card

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        if getattr(self, "peft_type", None) != mask_peft_type():
            return original_card(self, output_dir)
        return None

    print_trainable_parameters._sparse_peft_display = True
    peft_model_cls.print_trainable_parameters = print_trainable_parameters
    peft_model_cls.create_or_update_model_card = create_or_update_model_card


def register() -> None:
    """Register config, tuner and prefix with PEFT. Safe to call again (PEFT itself raises on a second call)."""
    install_atomic_adapter_writes()
    install_safetensors_only_saves()
    install_mask_displays()
    peft_type = mask_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is MaskModel:
        return
    if registered is not None:
        raise RuntimeError(f"Another tuner ({registered!r}) is already registered as PEFT type {peft_type.value!r}.")
    register_peft_method(name=METHOD_NAME, config_cls=MaskConfig, model_cls=MaskModel, prefix=PREFIX)
