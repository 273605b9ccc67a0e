"""``MaskConfig``: the PEFT config of a learnable N:M mask adapter."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME
from peft.utils.peft_types import PeftType

from .constants import ONE_SHOT_PRIORS, PEFT_TYPE_VALUE
from .lowrank import PLACEMENTS
from .options import MaskOptions, is_eora_scale, is_fraction
from .patterns import validate_n_m

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Default ``target_modules`` per ``model_type``: every linear of the attention and MLP blocks. ``lm_head``,
#: embeddings and norms are never masked.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        t: _LLAMA_STYLE
        for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def mask_peft_type() -> PeftType:
    """Return the ``PeftType`` member of the mask method, adding it to the enum on first use.

    PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
    a plugin cannot add one through a public API; this is the one place that adds ours.

    ``enum`` has no public way to extend a finished class, so the member is built the way ``EnumType`` builds
    string members and entered in the three tables that lookups use (by name, by value, iteration order).
    """
    value = PEFT_TYPE_VALUE
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


@dataclass(frozen=True)
class AdapterLocation:
    """Where a saved adapter is being loaded from: PEFT's ``model_id`` (local folder or Hub repo id), its
    ``subfolder`` and the ``hf_hub_download`` keyword arguments (revision, token, cache folder, ...)."""

    name_or_path: str
    subfolder: Optional[str] = None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)


#: The PEFT functions that read an adapter's config and then inject the adapter and load its weights file.
_PEFT_LOADERS = {("peft.peft_model", "from_pretrained"), ("peft.peft_model", "load_adapter")}


@dataclass
class MaskConfig(MaskOptions, PeftConfig):
    """Configuration of a MaskLLM mask adapter: which layers get a learnable N:M mask and how it is trained.

    Every targeted linear layer keeps its frozen weight ``W [out, in]`` and gains logits ``[out*in/m, C(m, n)]``
    over the N:M patterns of each group of ``m`` consecutive input weights. Training samples soft masks with
    Gumbel-softmax (temperature ``tau`` and logit scale ``kappa`` annealed linearly from start to end over the
    run); evaluation uses the hard argmax mask, which keeps exactly ``n`` of every ``m`` weights.

    The fields of the method, with their defaults and help, are :class:`~sparse_peft.options.MaskOptions`'s; PEFT's
    own (``task_type``, ``inference_mode``, ``base_model_name_or_path``, ...) are ``PeftConfig``'s. This class
    validates them and adds the loading and saving behaviour.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = mask_peft_type()
        validate_n_m(self.n, self.m)
        for name in ("tau_start", "tau_end", "kappa_start", "kappa_end", "logit_init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"MaskConfig.{name} must be a positive number, got {value!r}.")
        for name in ("prior_strength", "sparse_reg"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"MaskConfig.{name} must be a number >= 0, got {value!r}.")
        if self.prior is not None and not (isinstance(self.prior, (str, os.PathLike)) and str(self.prior)):
            raise ValueError(
                f"MaskConfig.prior must be None, one of {ONE_SHOT_PRIORS} or the path / Hub id of a mask adapter, "
                f"got {self.prior!r}."
            )
        if self.prior is not None:
            self.prior = os.fspath(self.prior)
        if self.save_delta and not self.prior_is_adapter:
            raise ValueError(
                f"MaskConfig(save_delta=True) stores masks as changes to a general mask, but prior={self.prior!r} is "
                "not a saved mask adapter. Pass prior='<path or Hub id of the general mask adapter>', or drop "
                "save_delta."
            )
        if not is_fraction(self.prior_reselect):
            raise ValueError(f"MaskConfig.prior_reselect must be a number in [0, 1], got {self.prior_reselect!r}.")
        if self.prior_reselect and not self.prior_is_adapter:
            raise ValueError(
                f"MaskConfig(prior_reselect={self.prior_reselect}) re-selects a general mask for a task, but "
                f"prior={self.prior!r} is not a saved mask adapter. Pass prior='<path or Hub id of the general mask "
                "adapter>', or drop prior_reselect."
            )
        if self.logits_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"MaskConfig.logits_dtype must be 'float32' or 'bfloat16', got {self.logits_dtype!r}."
            )
        self._check_lowrank()
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)

    def _check_lowrank(self) -> None:
        if not (isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 0):
            raise ValueError(f"MaskConfig.lora_rank must be an integer >= 0, got {self.lora_rank!r}.")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"MaskConfig.lora_alpha must be a positive number or None, got {self.lora_alpha!r}.")
        if self.lora_placement not in PLACEMENTS:
            raise ValueError(f"MaskConfig.lora_placement must be one of {PLACEMENTS}, got {self.lora_placement!r}.")
        if self.init_lora_weights not in (True, False, "eora"):
            raise ValueError(
                f"MaskConfig.init_lora_weights must be True, False or 'eora', got {self.init_lora_weights!r}."
            )
        if not is_eora_scale(self.eora_scale):
            raise ValueError(f"MaskConfig.eora_scale must be 'auto' or a finite number >= 0, got {self.eora_scale!r}.")
        if self.lora_save_dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"MaskConfig.lora_save_dtype must be 'bfloat16' or 'float32', got {self.lora_save_dtype!r}."
            )
        if self.init_lora_weights == "eora" and self.lora_rank == 0:
            raise ValueError(
                "MaskConfig(init_lora_weights='eora') initialises a low-rank update, but lora_rank=0 asks for none. "
                "Set lora_rank > 0 (e.g. 16), or drop init_lora_weights."
            )
        if not self.train_mask and self.lora_rank == 0:
            raise ValueError(
                "MaskConfig(train_mask=False) freezes the mask, so with lora_rank=0 nothing would train. Set "
                "lora_rank > 0 to train a low-rank update on the frozen mask, or keep train_mask=True."
            )

    @property
    def lora_scale(self) -> float:
        """``s = lora_alpha / lora_rank`` (1 when ``lora_alpha`` is None); 0 without an update."""
        if self.lora_rank == 0:
            return 0.0
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.lora_rank

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """PEFT's ``from_pretrained``; when PEFT's own loader (``PeftModel.from_pretrained`` / ``load_adapter``)
        calls it, the config also remembers the adapter's location (see :meth:`take_pending_load`), so that the
        weights file can be checked against the base model before anything is injected.

        The location is a plain attribute, not a field: it is never written to ``adapter_config.json``. A config
        read by user code (e.g. to start a new adapter with the same settings) remembers nothing.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        caller = sys._getframe(1)
        if (caller.f_globals.get("__name__"), caller.f_code.co_name) in _PEFT_LOADERS:
            hub_kwargs, _, _ = cls._split_kwargs(kwargs)
            hub_kwargs.pop("user_agent", None)
            config._pending_load = AdapterLocation(os.fspath(pretrained_model_name_or_path), subfolder, hub_kwargs)
        return config

    def take_pending_load(self) -> Optional[AdapterLocation]:
        """The location PEFT's loader read this config from, if its weights have not been injected yet; then
        forgets it (the first injection of the config is the load)."""
        return self.__dict__.pop("_pending_load", None)

    @property
    def prior_is_adapter(self) -> bool:
        """True if ``prior`` names a saved mask adapter (the transfer path) rather than a one-shot pruner."""
        return self.prior is not None and self.prior not in ONE_SHOT_PRIORS

    @property
    def adds_prior_noise(self) -> bool:
        """Whether the initial logits get the prior formula's random part (``prior_noise``, resolved): by default
        for a one-shot prior whose mask trains, never for a mask adapter or a frozen mask (``train_mask=False``
        keeps the prior's own mask, not a perturbed one)."""
        if self.prior_noise is not None:
            return self.prior_noise
        return not self.prior_is_adapter and self.train_mask

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields: sets (PEFT makes ``target_modules`` one) as sorted lists, so that a saved
        ``adapter_config.json`` does not depend on the process's string hashing; ``calibration`` is runtime data
        and is left out."""
        data = super().to_dict()
        data.pop("calibration", None)
        return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``save_pretrained`` with ``init_weights=False`` (the logits are in the weights file), atomically.

        PEFT writes ``adapter_config.json`` in place; here it writes into a temporary folder next to it, and the file
        then replaces the old one with one rename, so a failed save leaves the previous config intact.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        saved = copy.copy(self)
        saved.init_weights = False
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=f".{CONFIG_NAME}.") as staging:
            super(MaskConfig, saved).save_pretrained(staging, **kwargs)
            staged = os.path.join(staging, CONFIG_NAME)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(staged, os.path.join(save_directory, CONFIG_NAME))
