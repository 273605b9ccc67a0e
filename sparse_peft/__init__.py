"""sparse-peft: learnable N:M sparsity masks (MaskLLM) as PEFT mask adapters.

``import sparse_peft`` registers the mask method with PEFT, so ``get_peft_model(model, MaskConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*.from_pretrained`` work with mask adapters. It loads neither
torch nor PEFT itself: the public names are imported from their modules on first use, and the registration runs
at once if PEFT is already imported, else as soon as it is (:mod:`~sparse_peft.registration_hook`).

The modules, each importing only those above it in this list:

* leaves: ``allocator`` (glibc keeping freed memory), ``fused`` (the fused CPU kernels), ``constants`` (PEFT type,
  key prefixes, prior names, command-line defaults), ``options`` (:class:`MaskConfig`'s fields),
  ``registration_hook`` (when the registration runs), ``utils`` (atomic writes, the cache folder, ``[out, in]``
  weight views), ``annealing`` (schedule values), ``download`` (Hub downloads), ``lowrank`` (low-rank updates of
  masked weights: the EoRA-style math);
* ``patterns`` (N:M mask math);
* ``optim`` (AdamW for bfloat16 logits);
* ``config`` (:class:`MaskConfig`), ``codec`` (the adapter file format), ``pruners`` (magnitude, Wanda, SparseGPT),
  ``teacher`` (the dense model's outputs cached for distillation, and the KL from them);
* ``layer`` (:class:`MaskedLinear`), ``adapter_io`` (reading adapters, base checks), ``published`` (MaskLLM's
  published ``.npz`` masks);
* ``lowrank_init`` (``init_lora_weights='eora'`` on a model);
* ``prior_masks`` (the masks a ``prior`` asks for);
* ``model`` (:class:`MaskModel`, the tuner);
* ``schedule`` (Trainer callback), ``stats``, ``export`` (2:4 kernels);
* ``training``, ``oneshot`` (:func:`~sparse_peft.oneshot.prune`), ``hub`` (push with a model card), ``data``,
  ``evaluation``;
* ``registration`` (PEFT registration), ``commands`` (what the command-line commands do), this package;
* ``cli`` (the command line's options; it imports ``commands`` once the arguments have parsed).
"""

import importlib

from .registration_hook import register_when_peft_is_imported

#: The public names and the modules that define them, imported on first use (``sparse_peft.MaskConfig``,
#: ``from sparse_peft import MaskConfig``), so that ``import sparse_peft`` loads neither torch nor PEFT.
_EXPORTS = {
    "MaskConfig": "config",
    "MaskModel": "model",
    "MaskSchedule": "annealing",
    "MaskScheduleCallback": "schedule",
    "MaskedLinear": "layer",
    "import_published_masks": "published",
    "load_mask_adapter": "adapter_io",
    "load_shipped_model": "data",
    "mask_peft_type": "config",
    "mask_stats": "stats",
    "push_mask_adapter": "hub",
    "register": "registration",
    "repoint_general_mask": "hub",
    "retain_freed_memory": "allocator",
    "schedule_at": "annealing",
    "update_mask_schedule": "schedule",
}

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """A public name (imported from its module on first use) or a submodule (``sparse_peft.data``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


register_when_peft_is_imported(__name__)
