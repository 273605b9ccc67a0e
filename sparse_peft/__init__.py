"""sparse-peft: learnable N:M sparsity masks (MaskLLM) as PEFT mask adapters.

``import sparse_peft`` registers the mask method with PEFT, so ``get_peft_model(model, MaskConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*.from_pretrained`` work with mask adapters.
"""

from .config import MaskConfig
from .hub import push_mask_adapter
from .layer import MaskedLinear
from .model import MaskModel
from .published import import_published_masks
from .registration import mask_peft_type, register
from .schedule import MaskSchedule, MaskScheduleCallback, schedule_at, update_mask_schedule
from .stats import mask_stats
from .storage import load_mask_adapter

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
    "mask_peft_type",
    "mask_stats",
    "push_mask_adapter",
    "schedule_at",
    "update_mask_schedule",
]
