"""The fields of :class:`~sparse_peft.MaskConfig`: types, defaults and help text.

Imports nothing heavy (no torch, no PEFT), so that the command line builds its options from these fields without
loading a model library; :class:`~sparse_peft.MaskConfig` (``MaskOptions`` + PEFT's ``PeftConfig``) validates them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

__all__ = ["MaskOptions", "auto_or_number", "fraction", "is_eora_scale", "is_fraction"]


def is_eora_scale(value: Any) -> bool:
    """Whether ``value`` is a valid ``eora_scale``: ``"auto"`` or a finite number >= 0 (not a bool)."""
    if value == "auto":
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _checked_number(text: str, valid: Callable[[Any], bool], expected: str) -> float:
    """``float(text)`` if ``valid`` accepts it, else ``argparse.ArgumentTypeError`` naming ``expected`` and it."""
    try:
        number = float(text)
    except ValueError:
        number = None
    if not valid(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return number


def auto_or_number(text: str) -> Union[str, float]:
    """Parse a command-line value of ``eora_scale`` (an argparse ``type``): ``"auto"`` as is, else a finite number
    >= 0; ``argparse.ArgumentTypeError`` naming the value otherwise."""
    return text if text == "auto" else _checked_number(text, is_eora_scale, "auto or a finite number >= 0")


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number in ``[0, 1]`` (not a bool, not NaN): a valid ``prior_reselect``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def fraction(text: str) -> float:
    """Parse a command-line fraction in ``[0, 1]`` (an argparse ``type``); ``argparse.ArgumentTypeError`` naming the
    value otherwise."""
    return _checked_number(text, is_fraction, "a number in [0, 1]")


@dataclass
class MaskOptions:
    """The mask method's settings (see :class:`~sparse_peft.MaskConfig` for what they do together)."""

    n: int = field(default=2, metadata={"help": "Weights kept in every group of m (N of N:M)."})
    m: int = field(default=4, metadata={"help": "Group size along the input dimension (M of N:M), at most 8."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffixes) or a regex to mask; 'all-linear' for every linear but the output "
            "layer. Default: the attention and MLP linears of known architectures (see DEFAULT_TARGET_MODULES)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave dense."}
    )
    tau_start: float = field(default=4.0, metadata={"help": "Gumbel-softmax temperature at step 0."})
    tau_end: float = field(default=0.05, metadata={"help": "Gumbel-softmax temperature at the last step."})
    kappa_start: float = field(default=100.0, metadata={"help": "Logit scale at step 0."})
    kappa_end: float = field(default=500.0, metadata={"help": "Logit scale at the last step."})
    prior: Optional[str] = field(
        default=None,
        metadata={
            "help": "Initial mask the logits favour: None (random logits), 'magnitude', 'wanda', 'sparsegpt' "
            "(the last two need `calibration`), or the local path / Hub id of a saved mask adapter (transfer)."
        },
    )
    prior_strength: float = field(default=3.0, metadata={"help": "alpha of the prior formula (paper: 3)."})
    prior_noise: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Whether the prior formula adds the paper's random part (at alpha 3 ~5% of groups start off the "
            "prior). None: yes for a one-shot pruner whose mask trains; no for a mask-adapter prior, so that a task "
            "mask starts exactly at its general mask, and no with train_mask=False, which keeps the prior's own mask. "
            "True for an adapter that holds a one-shot mask to learn from (benchmarks/quality.py)."
        },
    )
    prior_reselect: float = field(
        default=0.0,
        metadata={
            "help": "With a mask adapter as `prior` and `calibration` (the task's text): per layer, the fraction of "
            "the groups where the prior's pattern differs from a one-shot SparseGPT mask of the calibration inputs "
            "that take SparseGPT's pattern, those whose Wanda saliency |W|*||X|| gains most (sparse_peft.reselect). "
            "0: the prior's mask as is."
        },
    )
    logit_init_std: float = field(default=0.01, metadata={"help": "Std of the random initial logits."})
    sparse_reg: float = field(
        default=1e-5,
        metadata={
            "help": "lambda of the sparse weight regulariser -lambda*sum||W*mask||^2, annealed linearly to 0. The "
            "paper's 1e-5 assumes ~1M tokens per step: Adam gives this deterministic term full-size steps while a "
            "small batch's noisy task gradient averages out, so with a few hundred to thousand tokens per step it "
            "drives the masks towards magnitude pruning. Use 0 for small batches (docs/training.md)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved in full besides the masks, e.g. a task head."}
    )
    save_logits: bool = field(
        default=False,
        metadata={"help": "Also save the float logits (to continue training); otherwise only the packed hard mask."},
    )
    save_delta: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Save only the groups whose pattern differs from the general mask `prior` (a saved mask adapter) "
            "plus a reference to it (`prior` and `prior_sha256`); loading then needs that general mask. Default "
            "(None): True when `prior` is a saved mask adapter, else False."
        },
    )
    prior_sha256: Optional[str] = field(
        default=None,
        metadata={"help": "sha256 of the prior mask adapter's adapter_model.safetensors, recorded when the prior is "
                  "loaded; a delta-coded adapter is only decoded against a general mask with this hash. Set "
                  "automatically."},
    )
    prior_revision: Optional[str] = field(
        default=None,
        metadata={
            "help": "Commit of the prior's Hub repo to use (default: its main branch). Recorded when the prior is a "
            "mask adapter on the Hub, so a delta-coded adapter keeps decoding after its general mask's repo moves on."
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Rank r of a low-rank update B [out, r] @ A [r, in] per masked layer, trained with the mask (0: "
            "mask only). See lora_placement for where it acts."
        },
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "The update is scaled by lora_alpha / lora_rank (default: lora_rank, scale 1)."}
    )
    lora_placement: str = field(
        default="under_mask",
        metadata={
            "help": "'under_mask': effective weight (W + s B A) * mask, so merge_and_unload gives exactly N:M "
            "weights. 'dense_residual': W * mask + s B A, a small dense matmul beside the sparse one at inference; "
            "it cannot be merged into an N:M weight."
        },
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={
            "help": "True: B = 0 and A Kaiming-uniform (PEFT's LoRA default; the adapter starts as the mask alone). "
            "'eora': training-free, from `calibration`: the rank-r update that best restores each layer's dense "
            "output on the calibration inputs, in the eigenspace of their covariance (see sparse_peft.lowrank)."
        },
    )
    eora_scale: Union[float, str] = field(
        default="auto",
        metadata={
            "help": "Factor on every B of the init_lora_weights='eora' update. 'auto' (default): of 0, 0.25, 0.5, "
            "0.75 and 1, the one that brings the model's last hidden states on the calibration inputs closest to "
            "the dense model's (the layer-wise fit, applied whole, can overshoot on a mask learned end to end); "
            "or a number >= 0 (1: the fit as computed)."
        },
    )
    lora_save_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of B and A in the saved adapter: 'bfloat16' (default) or 'float32'. Training keeps "
                  "them in float32."},
    )
    train_mask: bool = field(
        default=True,
        metadata={
            "help": "False: keep the initial hard mask (e.g. a general mask as `prior`) frozen and train only the "
            "low-rank update (needs lora_rank > 0); training then uses the hard mask, at about LoRA's cost."
        },
    )
    logits_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the trainable [G, C] logits: 'float32' (default) or 'bfloat16' (half the bytes of the "
            "logits, their gradients and AdamW's moments; train them with "
            "sparse_peft.training.bf16_logits_optimizer, which rounds stochastically so that updates below "
            "bfloat16's resolution are not lost). The Gumbel softmax is computed in float32 either way; saved "
            "logits (save_logits) are float32, which holds bfloat16 exactly."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Initialise the logits from `prior`. Saved adapters store False: their logits come from the "
            "file, so loading one never recomputes its prior."
        },
    )
    calibration: Optional[Any] = field(
        default=None,
        metadata={
            "help": "Token ids [num_samples, seq_len] for the 'wanda'/'sparsegpt' priors and for "
            "init_lora_weights='eora' (see "
            "sparse_peft.data.calibration_from_texts). Runtime only: not saved."
        },
    )
