"""``MaskedLinear``: a PEFT tuner layer that multiplies a frozen linear weight by a learnable N:M mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import transpose

from .annealing import MaskSchedule, schedule_at
from .config import MaskConfig
from .constants import LOGITS, LORA_A, LORA_B, plain_name
from .fused import kernel_for
from .patterns import (
    candidate_patterns,
    check_groupable,
    draw_seed,
    hard_mask_from_indices,
    indices_from_mask,
    mask_from_probs,
    pattern_indices,
    prior_logits,
    random_logits,
    soft_mask,
    soft_mask_logit_grad,
    soft_mask_probs,
)
from .utils import fan_in_fan_out, weight_out_in


@dataclass
class _AdapterSpec:
    n: int
    m: int
    schedule: MaskSchedule
    lora_scale: float = 0.0  # s of the low-rank update s * B @ A (0: none)
    placement: str = "under_mask"  # where the update acts (sparse_peft.lowrank.PLACEMENTS)
    train_mask: bool = True  # False: the logits stay frozen and training uses the hard mask


@dataclass
class _Sample:
    """Everything that fixes one training forward's soft mask besides the logits."""

    tau: float
    kappa: float
    seed: int  # Gumbel noise seed (see patterns.gumbel_noise)
    sparse_reg: float  # lambda of the regulariser
    save_probs: bool  # keep the [C, G] Gumbel-softmax weights for backward instead of recomputing them
    lora_scale: float = 0.0  # s of an update under the mask: W_eff = (W + s * B @ A) * soft_mask


def _masked_weight(weight: torch.Tensor, probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``W * soft_mask``: ``[out, in]`` weight and ``[C, G]`` candidate weights -> ``[out, in]`` in W's dtype."""
    mask = mask_from_probs(probs, candidates).to(weight.dtype)  # [G, M]
    return (weight.reshape(mask.shape) * mask).view(weight.shape)


class _MaskedLinearFunction(torch.autograd.Function):
    """``F.linear(x, W * soft_mask(logits), bias)`` with a hand-written backward that keeps no mask activations.

    The straightforward autograd graph keeps, per layer until backward, the ``[G, C]`` Gumbel-softmax weights and
    the ``[out, in]`` masked weight (10 bytes per fp32 weight for 2:4) plus large temporaries. This function saves
    only references to tensors that exist anyway (``x``, which any linear keeps, ``W``, ``bias``, the logits) and
    the noise seed; backward regenerates the same Gumbel sample from the seed, rebuilds ``W * mask`` and computes
    ``dL/dlogits`` with :func:`~sparse_peft.patterns.soft_mask_logit_grad`. ``W`` and ``bias`` are frozen (no
    gradient). With ``save_probs`` it keeps the ``[C, G]`` float32 weights instead (6 bytes per weight for 2:4) and
    skips regenerating them. Under autocast the linear runs in the autocast dtype and so do both backward GEMMs.
    Where :func:`~sparse_peft.fused.kernel_for` applies (CPU, float32 ``[out, in]`` weights, no update under the
    mask) the soft mask, ``W * mask``, the regulariser and the logits' gradient come from the fused CPU kernel:
    one pass in forward and one in backward, which with ``save_probs`` reads the kept weights instead of regenerating
    them.

    It also adds the sparse regulariser: the loss is ``task_loss - lam * ||W * mask||^2`` with ``W`` frozen, whose
    gradient w.r.t. the masked weight is ``-2 * lam * W_eff``. Adding it here keeps it exact under gradient
    checkpointing of any kind. The second output is the regulariser's value ``lam * ||W_eff||^2`` (float32 scalar,
    not differentiable; zero when ``lam == 0``).

    With a low-rank update under the mask (``lora_a [r, in]``, ``lora_b [out, r]``, ``sample.lora_scale``), ``W``
    is replaced by ``W + s * B @ A`` everywhere above (rebuilt in backward, not saved), and backward also returns
    ``dL/dB = s * (dL/dW_eff * mask) @ A^T`` and ``dL/dA = s * B^T @ (dL/dW_eff * mask)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, logits, candidates, sample: _Sample, lora_a=None, lora_b=None):
        kernel = None if lora_a is not None else kernel_for(weight, logits, *candidates.shape)
        reg = torch.zeros((), device=weight.device)
        probs = None
        if kernel is not None:
            masked, square, probs = kernel.forward(weight, logits, candidates.float(), sample.seed, sample.kappa,
                                                   sample.tau, sample.sparse_reg > 0, sample.save_probs)
            if sample.sparse_reg > 0:
                reg = sample.sparse_reg * square
        else:
            probs = soft_mask_probs(logits, sample.tau, sample.kappa, sample.seed)
            masked = _masked_weight(_updated_weight(weight, lora_a, lora_b, sample.lora_scale), probs, candidates)
            if sample.sparse_reg > 0:
                reg = sample.sparse_reg * torch.linalg.vector_norm(masked, dtype=torch.float32).square()
        out = F.linear(x, masked, bias)
        ctx.save_for_backward(x, weight, logits, candidates, probs if sample.save_probs else None, lora_a, lora_b)
        ctx.sample, ctx.kernel = sample, kernel
        ctx.mark_non_differentiable(reg)
        return out, reg

    @staticmethod
    def backward(ctx, grad_out, _grad_reg):
        x, weight, logits, candidates, probs, lora_a, lora_b = ctx.saved_tensors
        sample = ctx.sample
        if ctx.kernel is not None:
            return _kernel_backward(ctx, grad_out, x, weight, logits, candidates, probs)
        if probs is None:
            probs = soft_mask_probs(logits, sample.tau, sample.kappa, sample.seed)
        weight = _updated_weight(weight, lora_a, lora_b, sample.lora_scale)
        masked = _masked_weight(weight, probs, candidates)
        grad_x = grad_logits = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ masked.to(grad_out.dtype)
        if any(ctx.needs_input_grad[i] for i in (3, 6, 7)):
            # the weight-gradient GEMM: dL/dW_eff [out, in], then dL/dmask = dL/dW_eff * W
            grad_masked = _weight_gradient(grad_out, x, weight.dtype)
            if sample.sparse_reg > 0:
                grad_masked.sub_(masked, alpha=2.0 * sample.sparse_reg)
            if lora_a is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7]):
                grad_update = _masked_weight(grad_masked, probs, candidates).float() * sample.lora_scale
                grad_a = lora_b.t() @ grad_update if ctx.needs_input_grad[6] else None
                grad_b = grad_update @ lora_a.t() if ctx.needs_input_grad[7] else None
            if ctx.needs_input_grad[3]:
                grad_mask = grad_masked.mul_(weight).reshape(-1, candidates.shape[1])  # [G, M]
                grad_logits = soft_mask_logit_grad(grad_mask, probs, candidates, sample.tau, sample.kappa)
                grad_logits = grad_logits.to(logits.dtype)
        return grad_x, None, None, grad_logits, None, None, grad_a, grad_b


def _weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight-gradient GEMM ``dL/dW_eff = grad_out^T @ x``: ``[out, in]`` in ``dtype``."""
    grad = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
    return grad.to(dtype)


def _kernel_backward(ctx, grad_out, x, weight, logits, candidates, probs) -> tuple:
    """``_MaskedLinearFunction.backward`` through the fused CPU kernel (no update under the mask): one kernel call
    rebuilds ``W * mask`` for ``dL/dx`` and computes ``dL/dlogits`` (regulariser included) from ``dL/dW_eff``, from
    forward's kept ``probs [C, G]`` or, where None, from the sample regenerated from its seed."""
    sample, kernel = ctx.sample, ctx.kernel
    patterns = candidates.float()
    grad_x = grad_logits = None
    if ctx.needs_input_grad[3]:
        grad_masked = _weight_gradient(grad_out, x, weight.dtype).contiguous()
        kept = probs if probs is not None else logits.new_empty(0, dtype=torch.float32)
        masked, grad_logits = kernel.backward(grad_masked, weight, logits, patterns, sample.seed, sample.kappa,
                                              sample.tau, sample.sparse_reg, ctx.needs_input_grad[0], kept)
    elif ctx.needs_input_grad[0]:
        masked = kernel.forward(weight, logits, patterns, sample.seed, sample.kappa, sample.tau, False, False)[0]
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ masked.to(grad_out.dtype)
    return grad_x, None, None, grad_logits, None, None, None, None


def _updated_weight(
    weight: torch.Tensor, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """``W + scale * B @ A`` in W's dtype (``W`` itself without an update): ``[out, in]``, ``B [out, r]``,
    ``A [r, in]``."""
    if lora_a is None:
        return weight
    return weight + (scale * (lora_b @ lora_a)).to(weight.dtype)


def stored_indices(state: torch.Tensor) -> torch.Tensor:
    """int64 ``[G]`` pattern indices of an adapter's stored state: float logits ``[G, C]`` or uint8 indices ``[G]``."""
    return pattern_indices(state) if state.is_floating_point() else state.long()


class MaskedLinear(nn.Module, BaseTunerLayer):
    """Wraps an ``nn.Linear`` (or a GPT-2 ``Conv1D``) and masks its weight with the active mask adapter.

    Per adapter it holds ``maskllm_logits[adapter]``: ``[G, C]`` with ``G = out * in / m``, float32 (or bfloat16,
    ``MaskConfig.logits_dtype``). In training mode the forward samples a soft mask (Gumbel-softmax, a fresh sample
    per call); in eval mode it uses the hard argmax mask, cached until the logits change. The base weight is never
    trained.

    An adapter created for inference only (``inference_mode=True``, e.g. ``PeftModel.from_pretrained`` without
    ``is_trainable=True``) holds its hard mask instead: uint8 pattern indices ``[G]`` (0.25 byte per masked weight
    for 2:4, against 6 for float32 logits). It evaluates, merges and saves like any adapter, but cannot train.
    """

    adapter_layer_names = (LOGITS, LORA_A, LORA_B)
    other_param_names = ("maskllm_spec",)
    #: Memory option of the training forward. True (default): backward regenerates the Gumbel sample from its seed,
    #: so no mask activation stays alive between forward and backward. False: keep the ``[C, G]`` float32
    #: Gumbel-softmax weights (6 bytes per masked weight for 2:4) and skip regenerating them, on the PyTorch path
    #: and through the fused CPU kernel alike. See :func:`set_soft_mask_memory`.
    recompute_soft_mask: bool = True

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MaskConfig,
        schedule: Optional[MaskSchedule] = None,
        prior_mask: Optional[torch.Tensor] = None,
        layer_name: str = "layer",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.maskllm_logits = nn.ParameterDict()
        self.maskllm_lora_A = nn.ParameterDict()  # [r, in] per adapter with a low-rank update
        self.maskllm_lora_B = nn.ParameterDict()  # [out, r]
        self.maskllm_spec: dict[str, _AdapterSpec] = {}
        self.layer_name = layer_name
        # {adapter: (logits version key, hard mask [out, in] in the weight's dtype and device)}, one adapter at most
        self._hard_mask_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._last_sparse_reg: Optional[torch.Tensor] = None
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, schedule, prior_mask)

    # -- shape helpers --------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the base weight, whatever its storage layout."""
        return tuple(self.base_weight().shape)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight viewed as ``[out, in]``."""
        return weight_out_in(self.get_base_layer())

    # -- adapters -------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        config: MaskConfig,
        schedule: Optional[MaskSchedule] = None,
        prior_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Add adapter ``adapter_name`` of ``config``: logits from ``prior_mask`` (bool ``[out, in]``, exactly n:m,
        at ``config.prior_strength``; for a mask-adapter prior without noise, so the initial hard mask is the prior)
        or random (std ``config.logit_init_std``).

        ``schedule`` is the adapter's schedule, shared by all its layers (default: step 0 of ``config``). With
        ``config.inference_mode`` the adapter keeps only the argmax of those logits, as uint8 indices ``[G]``.

        With ``config.lora_rank = r > 0`` it also gets a float32 update ``B [out, r]``, ``A [r, in]``: ``A``
        Kaiming-uniform and ``B`` zero (``init_lora_weights=True`` or ``'eora'``, whose values the tuner computes
        after injection), or both Kaiming-uniform (``False``, a non-zero start for tests).
        """
        n, m, init_std = config.n, config.m, config.logit_init_std
        schedule = schedule_at(config, 0, 1) if schedule is None else schedule
        num_groups = check_groupable(self.weight_shape, m, self.layer_name)
        if prior_mask is not None:
            if tuple(prior_mask.shape) != self.weight_shape:
                raise ValueError(
                    f"{self.layer_name}: prior mask has shape {tuple(prior_mask.shape)}, the weight is "
                    f"{self.weight_shape}."
                )
            # A saved mask adapter (a general mask) is the start of a task mask: without the formula's noise its
            # hard mask is exactly the prior's; a one-shot prior keeps the paper's noise (~5% of groups off it);
            # config.prior_noise overrides either.
            logits = prior_logits(prior_mask, n, m, config.prior_strength, init_std, noise=config.adds_prior_noise)
        else:
            logits = random_logits(num_groups, n, m, init_std)
        device = self.get_base_layer().weight.device
        if device.type == "meta":  # low_cpu_mem_usage: the values come from a checkpoint
            device = torch.device("cpu")
        if config.inference_mode:
            state = nn.Parameter(pattern_indices(logits).to(device=device, dtype=torch.uint8), requires_grad=False)
        else:
            state = nn.Parameter(logits.to(device=device, dtype=getattr(torch, config.logits_dtype)))
        self.maskllm_logits[adapter_name] = state
        if config.lora_rank:
            out_features, in_features = self.weight_shape
            lora_a = torch.empty(config.lora_rank, in_features, device=device)
            lora_b = torch.empty(out_features, config.lora_rank, device=device)
            nn.init.kaiming_uniform_(lora_a, a=5**0.5)
            if config.init_lora_weights is False:
                nn.init.kaiming_uniform_(lora_b, a=5**0.5)
            else:
                nn.init.zeros_(lora_b)
            self.maskllm_lora_A[adapter_name] = nn.Parameter(lora_a)
            self.maskllm_lora_B[adapter_name] = nn.Parameter(lora_b)
        self.maskllm_spec[adapter_name] = _AdapterSpec(
            n=n, m=m, schedule=schedule, lora_scale=config.lora_scale, placement=config.lora_placement,
            train_mask=config.train_mask,
        )
        self.set_adapter(self.active_adapters)

    # -- masks ----------------------------------------------------------------------------------------------
    def _candidates(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        spec = self.maskllm_spec[adapter_name]
        return candidate_patterns(spec.n, spec.m, device=device)

    def hard_mask(self, adapter_name: str) -> torch.Tensor:
        """The eval mask ``[out, in]`` in the weight's dtype, exactly n ones in every group of m.

        Cached until the logits may have changed: the cache is dropped on every ``train()`` / ``eval()`` switch
        and after ``load_state_dict`` (fused optimizers update in place without bumping the version counter), and
        it is keyed on the logits' version counter and storage (in-place edits in eval mode) and on the weight's
        device and dtype. Only the most recently used adapter's mask is kept, so switching between many adapters
        costs one mask, not one per adapter.
        """
        key = self._hard_mask_key(adapter_name)
        cached = self._hard_mask_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_hard_mask(adapter_name))
            self._hard_mask_cache = {adapter_name: cached}
        return cached[1]

    def _hard_mask_key(self, adapter_name: str) -> tuple:
        logits = self.maskllm_logits[adapter_name]
        weight = self.get_base_layer().weight
        return (logits._version, logits.data_ptr(), weight.dtype, weight.device)

    def _compute_hard_mask(self, adapter_name: str) -> torch.Tensor:
        logits = self.maskllm_logits[adapter_name]
        weight = self.get_base_layer().weight
        with torch.no_grad():
            candidates = self._candidates(adapter_name, logits.device)
            mask = hard_mask_from_indices(self.pattern_indices(adapter_name), candidates)
            return mask.view(self.weight_shape).to(device=weight.device, dtype=weight.dtype)

    def _transient_hard_mask(self, adapter_name: str) -> torch.Tensor:
        """:meth:`hard_mask` read from the cache where it holds ``adapter_name``, else computed and not stored."""
        cached = self._hard_mask_cache.get(adapter_name)
        if cached is not None and cached[0] == self._hard_mask_key(adapter_name):
            return cached[1]
        return self._compute_hard_mask(adapter_name)

    def holds_indices(self, adapter_name: str) -> bool:
        """True if ``adapter_name`` was created for inference only and holds uint8 pattern indices, not logits."""
        return not self.maskllm_logits[adapter_name].is_floating_point()

    def pattern_indices(self, adapter_name: str) -> torch.Tensor:
        """The hard choice of every group, int64 ``[G]`` (the argmax of the logits, or the stored indices)."""
        return stored_indices(self.maskllm_logits[adapter_name])

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``; adapters that hold indices stay frozen (integer tensors cannot require grad)."""
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        frozen = any(name in self.maskllm_logits and self.holds_indices(name) for name in names)
        super().set_adapter(adapter_names, inference_mode=inference_mode or frozen)
        for name in names:  # a frozen mask (train_mask=False) keeps its logits out of the optimizer
            if name in self.maskllm_spec and not self.maskllm_spec[name].train_mask:
                self.maskllm_logits[name].requires_grad_(False)

    def train(self, mode: bool = True) -> "MaskedLinear":
        self._hard_mask_cache.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._hard_mask_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def soft_mask(self, adapter_name: str, seed: Optional[int] = None) -> torch.Tensor:
        """A Gumbel-softmax sample ``[out, in]`` (float32) with the adapter's current tau and kappa.

        ``seed`` fixes the noise (the training forward draws a fresh one per call; the same seed gives the sample
        that forward used). Plain autograd: the reference for the fused training forward.
        """
        logits = self.maskllm_logits[adapter_name]
        schedule = self.maskllm_spec[adapter_name].schedule
        candidates = self._candidates(adapter_name, logits.device)
        return soft_mask(logits, candidates, schedule.tau, schedule.kappa, seed).view(self.weight_shape)

    def lowrank(self, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(A [r, in], B [out, r], s)`` of the adapter's low-rank update, or None if it has none."""
        if adapter_name not in self.maskllm_lora_A:
            return None
        return (self.maskllm_lora_A[adapter_name], self.maskllm_lora_B[adapter_name],
                self.maskllm_spec[adapter_name].lora_scale)

    def effective_weight(self, adapter_name: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The masked weight ``[out, in]`` that the eval forward multiplies by: ``W * mask`` or, with an update
        under the mask, ``(W + s B A) * mask`` (``mask``: default the hard mask). A dense-residual update is not in
        it (see :meth:`forward`)."""
        mask = self.hard_mask(adapter_name) if mask is None else mask
        weight, lowrank = self.base_weight(), self.lowrank(adapter_name)
        if lowrank is not None and self.maskllm_spec[adapter_name].placement == "under_mask":
            lora_a, lora_b, scale = lowrank
            weight = _updated_weight(weight, lora_a, lora_b, scale)
        return weight * mask

    def _masked_forward(self, x: torch.Tensor, adapter_name: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear(x, effective_weight, bias)`` plus a dense-residual update's ``s * (x A^T) B^T``."""
        weight = self.effective_weight(adapter_name, mask)
        x = self._cast_input_dtype(x, weight.dtype)
        return self._add_residual(F.linear(x, weight, self.get_base_layer().bias), x, adapter_name)

    def _add_residual(self, out: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lowrank = self.lowrank(adapter_name)
        if lowrank is None or self.maskllm_spec[adapter_name].placement != "dense_residual":
            return out
        lora_a, lora_b, scale = lowrank
        return out + scale * F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b).to(out.dtype)

    def _train_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``F.linear(x, W * soft_mask, bias)`` through :class:`_MaskedLinearFunction` (fresh Gumbel sample), with
        the adapter's low-rank update; with a frozen mask (``train_mask=False``) the hard mask instead."""
        base = self.get_base_layer()
        weight, bias = self.base_weight(), base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError(
                f"{self.layer_name}: the base weight or bias requires grad, but mask training keeps them frozen and "
                "computes no gradient for them. Call requires_grad_(False) on the base layer (get_peft_model does)."
            )
        spec = self.maskllm_spec[adapter_name]
        if not spec.train_mask:
            self._last_sparse_reg = None
            return self._masked_forward(x, adapter_name)
        if self.holds_indices(adapter_name):
            raise ValueError(
                f"{self.layer_name}: adapter {adapter_name!r} was loaded for inference and holds only its hard mask, "
                "so it cannot train. Load it with is_trainable=True (PeftModel.from_pretrained / load_adapter) to "
                "train."
            )
        logits = self.maskllm_logits[adapter_name]
        lowrank = self.lowrank(adapter_name)
        under = lowrank is not None and spec.placement == "under_mask"
        sample = _Sample(
            tau=spec.schedule.tau,
            kappa=spec.schedule.kappa,
            seed=draw_seed(),
            sparse_reg=spec.schedule.sparse_reg,
            save_probs=not self.recompute_soft_mask,
            lora_scale=spec.lora_scale if under else 0.0,
        )
        candidates = self._candidates(adapter_name, logits.device)
        x = self._cast_input_dtype(x, weight.dtype)
        extra = (lowrank[0], lowrank[1]) if under else ()
        out, reg = _MaskedLinearFunction.apply(x, weight, bias, logits, candidates, sample, *extra)
        # Recorded in every training forward (also the no-grad first pass of reentrant checkpointing) for the
        # reported loss, and replaced by None when lambda is 0 so that a value left by a checkpointing recompute
        # is never reported; the gradient is added inside _MaskedLinearFunction wherever autograd records.
        self._last_sparse_reg = reg if sample.sparse_reg > 0 else None
        return self._add_residual(out, x, adapter_name)

    def pop_sparse_reg(self) -> Optional[torch.Tensor]:
        """``lam * ||W * soft_mask||^2`` of the last training forward (a detached scalar), then forget it."""
        value, self._last_sparse_reg = self._last_sparse_reg, None
        return value

    def active_mask_adapter(self) -> Optional[str]:
        """The one active adapter of this layer (None if none is); ``ValueError`` if several are active."""
        active = [name for name in self.active_adapters if name in self.maskllm_logits]
        if len(active) > 1:
            raise ValueError(
                f"{self.layer_name}: {len(active)} mask adapters are active ({active}); a weight takes one mask at a "
                "time. Use set_adapter(<one name>)."
            )
        return active[0] if active else None

    # -- forward --------------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any
    ) -> torch.Tensor:
        """The base layer with the active adapter's mask: a soft mask in training, the hard mask in eval.

        ``adapter_names`` (PEFT's mixed-adapter batch, eval only): one adapter name per row of ``x`` (dim 0);
        each row goes through its own adapter's hard mask, see :meth:`_mixed_batch_forward`.
        """
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        adapter_name = self.active_mask_adapter()
        if self.merged or adapter_name is None:
            return self.base_layer(x, *args, **kwargs)
        if self.training:
            return self._train_forward(x, adapter_name)
        return self._masked_forward(x, adapter_name)

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if self.training:
            raise ValueError(
                f"{self.layer_name}: adapter_names (a mixed-adapter batch) is for inference only, but the layer is "
                "in training mode. Call model.eval() first, or train one adapter at a time with set_adapter."
            )
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(
                f"{self.layer_name}: adapter_names must be a list of adapter names (str), one per row of the batch; "
                f"got {adapter_names!r}."
            )
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"{self.layer_name}: adapter_names has {len(adapter_names)} names but the batch has {x.shape[0]} "
                "rows; pass one adapter name (or '__base__') per row."
            )
        if self.merged:
            raise ValueError(
                f"{self.layer_name}: cannot serve a mixed-adapter batch while adapter {self.merged_adapters} is "
                "merged into the weight. Call unmerge_adapter() first."
            )

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Rows of ``x`` grouped by adapter, each group through ``F.linear(rows, W * hard_mask(name), bias)``.

        ``x`` is ``[B, ..., in]`` with ``len(adapter_names) == B``; the result is ``[B, ..., out]``. Rows named
        ``"__base__"``, or an adapter this layer does not hold (one whose ``target_modules`` skip it), go through
        the dense base layer, as a single-adapter forward of that adapter does. Masks: an adapter whose mask the
        cache holds uses it; every other group's mask is computed for this forward and freed after its group, so
        the cache still holds one adapter's mask at most and a mixed batch of k adapters recomputes up to k masks
        per layer per forward (one ``[out, in]`` mask alive at a time).
        """
        result = None
        for name in dict.fromkeys(adapter_names):  # unique names in first-row order
            rows = torch.tensor([i for i, row in enumerate(adapter_names) if row == name], device=x.device)
            if name in self.maskllm_logits:
                out = self._masked_forward(x[rows], name, self._transient_hard_mask(name))
            else:
                out = self.base_layer(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[rows] = out.to(result.dtype)
        return result

    # -- merging --------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the hard mask of one adapter into the base weight (zeros where pruned), with its low-rank update
        under the mask (``(W + s B A) * mask``): the merged weight is exactly N:M and equals the eval forward's.

        With ``safe_merge=True`` the logits are checked first: NaN/inf logits still argmax to a valid-looking mask,
        so they are rejected instead. The dense weight is kept for :meth:`unmerge`.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"{self.layer_name}: cannot merge {adapter_names} on top of {self.merged_adapters}; a weight takes "
                "one mask. Unmerge first, or merge a single adapter."
            )
        name = adapter_names[0]
        if name not in self.maskllm_logits:
            return
        if safe_merge and not torch.isfinite(self.maskllm_logits[name]).all():
            raise ValueError(
                f"{self.layer_name}: adapter {name!r} has NaN or infinite mask logits; refusing to merge a mask "
                "derived from them. The training run diverged: restore an earlier checkpoint."
            )
        self.check_mergeable(name)
        base = self.get_base_layer()
        with torch.no_grad():
            merged = transpose(self.effective_weight(name), fan_in_fan_out(base))
            self._unmerged_weight = base.weight.detach().clone()
            base.weight.copy_(merged)
        self.merged_adapters.append(name)

    def check_mergeable(self, adapter_name: str) -> None:
        """Raise ``ValueError`` if ``adapter_name`` holds a dense-residual update, which no N:M weight can take."""
        lowrank = self.lowrank(adapter_name)
        if lowrank is not None and self.maskllm_spec[adapter_name].placement == "dense_residual":
            raise ValueError(
                f"{self.layer_name}: adapter {adapter_name!r} has a dense residual low-rank update (lora_placement="
                "'dense_residual'), and merging it would make the weight dense, not N:M; nothing was merged. Keep it "
                "unmerged (it runs as a small dense matmul beside the sparse weight), or train it with "
                "lora_placement='under_mask', whose merge stays N:M."
            )

    def unmerge(self) -> None:
        """Restore the dense base weight saved by :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            self.get_base_layer().weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = []

    def delete_adapter(self, adapter_name: str) -> None:
        self._hard_mask_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)


def set_soft_mask_memory(model: nn.Module, recompute: bool) -> None:
    """Choose what every mask layer of ``model`` keeps between a training forward and its backward.

    ``recompute=True`` (the default): nothing but the noise seed; backward regenerates the Gumbel sample (more
    compute: the soft mask is sampled twice per step). ``recompute=False``: the ``[C, G]`` float32 Gumbel-softmax
    weights, 4 * C / M bytes per masked weight (6 for 2:4), for a cheaper backward. Gradients are the same. Both
    options hold for the PyTorch path and for the fused CPU kernel (:mod:`sparse_peft.fused`).
    """
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    if not layers:
        raise ValueError("The model has no mask layers: wrap it with get_peft_model(model, MaskConfig(...)) first.")
    for layer in layers:
        layer.recompute_soft_mask = recompute


def mask_layers(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, MaskedLinear]:
    """``{base-model module name: layer}`` for every :class:`MaskedLinear` of ``model`` (holding ``adapter_name``,
    if given)."""
    return {
        plain_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, MaskedLinear) and (adapter_name is None or adapter_name in module.maskllm_logits)
    }


def encode_mask(mask: torch.Tensor, config: MaskConfig) -> torch.Tensor:
    """Logits ``[G, C]`` whose argmax is exactly the hard ``mask`` ``[out, in]``: the prior formula without noise.

    Used where only a hard mask is known (a hard-mask-only adapter file, a one-shot pruner's output); training
    from these logits treats the mask as a prior of strength ``config.prior_strength``.
    """
    alpha = config.prior_strength if config.prior_strength > 0 else 1.0
    return prior_logits(mask, config.n, config.m, alpha, config.logit_init_std, noise=False)


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Make ``adapter_name``'s hard mask exactly ``masks`` (``{base-model module name: 0/1 [out, in]}``).

    ``model`` is a ``PeftModel``; the logits become :func:`encode_mask` of each mask (or, for an adapter loaded for
    inference, its pattern indices). Used to turn one-shot pruner masks into a mask adapter.
    """
    layers = mask_layers(model, adapter_name)
    if layers.keys() != masks.keys():
        raise ValueError(
            f"Masks given for {len(masks)} layers, the adapter has {len(layers)}; they differ at e.g. "
            f"{sorted(layers.keys() ^ masks.keys())[:3]}."
        )
    config = model.peft_config[adapter_name]
    for name, layer in layers.items():
        with torch.no_grad():
            state = layer.maskllm_logits[adapter_name]
            if layer.holds_indices(adapter_name):
                state.copy_(indices_from_mask(masks[name], config.n, config.m))
            else:
                state.copy_(encode_mask(masks[name], config))
