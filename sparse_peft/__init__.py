"""sparse-peft: learnable N:M sparsity masks (MaskLLM) as PEFT mask adapters.

``import sparse_peft`` registers the mask method with PEFT, so ``get_peft_model(model, MaskConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*.from_pretrained`` work with mask adapters.

The modules, each importing only those above it in this list:

* leaves: ``fused`` (the fused CPU kernels), ``constants`` (PEFT type, key prefixes, prior names),
  ``utils`` (atomic writes, the cache folder, ``[out, in]`` weight views), ``annealing`` (schedule values),
  ``download`` (Hub downloads), ``lowrank`` (low-rank updates of masked weights: the EoRA-style math);
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
* ``registration`` (PEFT registration), this package, and ``cli``.
"""

from .adapter_io import load_mask_adapter
from .annealing import MaskSchedule, schedule_at
from .config import MaskConfig
from .constants import mask_peft_type
from .data import load_shipped_model
from .hub import push_mask_adapter, repoint_general_mask
from .layer import MaskedLinear
from .model import MaskModel
from .published import import_published_masks
from .registration import register
from .schedule import MaskScheduleCallback, update_mask_schedule
from .stats import mask_stats

register()

__version__ = "0.1.0"

__all__ = [
    "MaskConfig",
    "MaskModel",
    "MaskSchedule",
    "MaskScheduleCallback",
    "MaskedLinear",
    "import_published_masks",
    "load_mask_adapter",
    "load_shipped_model",
    "mask_peft_type",
    "mask_stats",
    "push_mask_adapter",
    "register",
    "repoint_general_mask",
    "schedule_at",
    "update_mask_schedule",
]
