"""Registration of the mask method with PEFT (``import sparse_peft`` runs :func:`register`).

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
a plugin cannot add one through a public API. :func:`mask_peft_type` adds our member in the one place below.

The type's value is what PEFT writes as ``"peft_type"`` in ``adapter_config.json`` and what it shows when a
process that has not imported sparse_peft tries to load such an adapter: PEFT raises
``KeyError: 'MASKLLM (IMPORT SPARSE_PEFT)'``. That is why the name carries the fix.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

#: The PEFT method name (lower case, as ``register_peft_method`` wants it); ``PeftType`` value is its upper case.
METHOD_NAME = "maskllm (import sparse_peft)"
#: Prefix of every parameter name of the method (``...q_proj.maskllm_logits.<adapter>``). Distinctive, so that
#: adapter names and base-model module names do not collide with it.
PREFIX = "maskllm_"


def mask_peft_type() -> PeftType:
    """Return the ``PeftType`` member of the mask method, adding it to the enum on first use.

    ``enum`` has no public way to extend a finished class, so the member is built the way ``EnumType`` builds
    string members and entered in the three tables that lookups use (by name, by value, iteration order).
    """
    value = METHOD_NAME.upper()
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, value, member)  # EnumType.__setattr__ refuses; this is `getattr(PeftType, value)`
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


def _atomic_adapter_writes() -> None:
    """Make ``PeftModel.save_pretrained`` write mask-adapter weights all-or-nothing.

    PEFT writes ``adapter_model.safetensors`` in place with ``peft.peft_model.safe_save_file``; a crash or a full
    disk mid-write would leave a truncated file where the user's previous adapter was. PEFT has no hook for the
    writer, so for state dicts of this method (and only those) we route it through a temp file + rename. Other
    PEFT methods get PEFT's writer unchanged.
    """
    import peft.peft_model

    original = peft.peft_model.safe_save_file
    if getattr(original, "_sparse_peft_atomic", False):
        return
    from .storage import atomic_write

    def safe_save_file(tensors, filename, metadata=None):
        if not any(f".{PREFIX}" in key for key in tensors):
            return original(tensors, filename, metadata=metadata)
        from safetensors.torch import save

        data = save(tensors, metadata=metadata)
        atomic_write(filename, lambda f: f.write(data))

    safe_save_file._sparse_peft_atomic = True
    peft.peft_model.safe_save_file = safe_save_file


def register() -> None:
    """Register config, tuner and prefix with PEFT. Safe to call again (PEFT itself raises on a second call)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import MaskConfig
    from .model import MaskModel

    _atomic_adapter_writes()
    peft_type = mask_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is MaskModel:
        return
    if registered is not None:
        raise RuntimeError(f"Another tuner ({registered!r}) is already registered as PEFT type {peft_type.value!r}.")
    register_peft_method(name=METHOD_NAME, config_cls=MaskConfig, model_cls=MaskModel, prefix=PREFIX)
