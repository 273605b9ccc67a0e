"""N:M mask math: candidate patterns, soft (Gumbel-softmax) and hard masks, the prior-to-logit formula.

Everything here is a pure function of tensors. Shapes use these names:

* ``out, in``: the shape of an ``nn.Linear`` weight ``W`` (``[out, in]``).
* ``M``: the group size along the input dimension, ``N``: the weights kept per group.
* ``G = out * in / M``: the number of groups in a weight, in row-major order (group ``g`` covers
  ``W.view(G, M)[g]``, i.e. ``M`` consecutive input-dimension weights of one output row).
* ``C = C(M, N)``: the number of candidate patterns, in ``itertools.combinations(range(M), N)`` order.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

from .fused import kernel_uniforms

#: Candidate weights below ``exp(LOG_PROB_CUT)`` (7.8e-20) of their group's largest are set to exactly 0 when a soft
#: mask is sampled for training (here and in ``csrc/soft_mask_cpu.cpp``). Weights that small would make subnormal
#: floats in ``W * mask``, the logits' gradient and AdamW's moments once tau is low, and CPU arithmetic and GEMMs on
#: subnormals are many times slower. What the cut drops is below float32 resolution in the mask, and the logits'
#: gradient it drops is at most ``kappa / tau * 7.8e-20 * |dL/dy|``, far under AdamW's epsilon.
LOG_PROB_CUT = -44.0


def validate_n_m(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n < m <= 8`` (the N:M configurations we support)."""
    if not (isinstance(n, int) and isinstance(m, int)):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}.")
    if not 0 < n < m <= 8:
        raise ValueError(
            f"Invalid N:M sparsity {n}:{m}: need 0 < n < m <= 8 (n weights kept in every group of m), "
            "e.g. n=2, m=4."
        )


def num_candidates(n: int, m: int) -> int:
    """``C(M, N)``: how many N:M patterns a group can take (6 for 2:4)."""
    return math.comb(m, n)


def index_bits(n: int, m: int) -> int:
    """Bits needed to store one group's pattern index: ``ceil(log2(C))`` (3 for 2:4)."""
    return max(1, math.ceil(math.log2(num_candidates(n, m))))


@lru_cache(maxsize=None)
def _candidate_table(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    validate_n_m(n, m)
    return tuple(
        tuple(1 if i in kept else 0 for i in range(m)) for kept in itertools.combinations(range(m), n)
    )


def candidate_patterns(
    n: int, m: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """All N:M binary patterns, ``[C, M]``, in ``itertools.combinations(range(M), N)`` order.

    For 2:4 the rows are 1100, 1010, 1001, 0110, 0101, 0011.
    """
    return torch.tensor(_candidate_table(n, m), device=device, dtype=dtype)


def check_groupable(shape: tuple[int, ...] | torch.Size, m: int, name: str = "weight") -> int:
    """Return the number of groups ``G`` of a ``[out, in]`` weight, or raise if ``in % m != 0``."""
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(shape)}.")
    out_features, in_features = shape
    if in_features % m != 0:
        raise ValueError(
            f"{name} has weight shape [out={out_features}, in={in_features}]: in_features={in_features} is not "
            f"divisible by m={m}, so it cannot be split into groups of {m}. Exclude this module from "
            "`target_modules` or choose an m that divides it."
        )
    return out_features * in_features // m


def draw_seed() -> int:
    """A seed for one Gumbel sample, drawn from torch's global CPU generator.

    Drawing it from the global generator makes samples reproducible under ``torch.manual_seed`` and replayable by
    gradient checkpointing (which restores that generator's state before recomputing a forward).
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def gumbel_noise(num_groups: int, num_candidates: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(U))``, candidate-major ``[C, G]`` float32, fully determined by ``seed``.

    Candidate-major because every per-group reduction over the ``C`` candidates is then an elementwise operation
    over ``C`` contiguous vectors of length ``G`` (several times faster than reducing rows of length 6). The same
    ``seed`` on the same device type always gives the same noise, so a backward pass can regenerate it instead of
    keeping it alive. On CPU the uniforms come from the fused kernel's counter-based generator while it is available
    (:func:`sparse_peft.fused.kernel_uniforms`), so the fused training path and this one draw the same sample.
    """
    noise = kernel_uniforms(seed, num_groups, num_candidates) if torch.device(device).type == "cpu" else None
    if noise is None:
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.empty(num_candidates, num_groups, device=device, dtype=torch.float32)
        noise.uniform_(generator=generator)
    return noise.log_().neg_().log_().neg_()


def soft_mask(
    logits: torch.Tensor, candidates: torch.Tensor, tau: float, kappa: float, seed: int | None = None
) -> torch.Tensor:
    """Sample a differentiable soft mask with Gumbel-softmax: the straightforward autograd implementation.

    ``y = softmax((kappa * logits + g) / tau)`` over the candidates with ``g = gumbel_noise(G, C, seed)``, and the
    mask is ``y @ S``. Training uses the fused, memory-lean :func:`soft_mask_probs` / :func:`soft_mask_logit_grad`
    pair instead; this function is their reference (same ``seed`` -> same sample).

    Args:
        logits: ``[G, C]`` float logits over the candidates.
        candidates: ``[C, M]`` patterns from :func:`candidate_patterns` (same device as ``logits``).
        tau: Gumbel-softmax temperature (> 0); smaller is closer to one-hot.
        kappa: logit scale applied before sampling.
        seed: the noise seed; ``None`` draws a fresh one (:func:`draw_seed`), i.e. a fresh sample per call.

    Returns:
        ``[G, M]`` mask in ``[0, 1]`` whose every row sums to ``N`` (up to rounding).
    """
    seed = draw_seed() if seed is None else seed
    noise = gumbel_noise(logits.shape[0], logits.shape[1], seed, logits.device).t()  # [G, C]
    weights = torch.softmax((logits * kappa + noise) / tau, dim=-1)  # [G, C]
    return weights @ candidates.to(weights.dtype)


def soft_mask_probs(logits: torch.Tensor, tau: float, kappa: float, seed: int) -> torch.Tensor:
    """The Gumbel-softmax candidate weights ``y`` of :func:`soft_mask`, computed without autograd, in place.

    Args:
        logits: ``[G, C]`` logits (float32 or bfloat16; computed in float32).
        tau, kappa, seed: as in :func:`soft_mask`.

    Returns:
        ``[C, G]`` float32 (candidate-major), every column sums to 1; weights under ``exp(LOG_PROB_CUT)`` of the
        column's largest are exactly 0 (:data:`LOG_PROB_CUT`). One ``[C, G]`` buffer is allocated; all steps
        after the noise run in place on it.
    """
    with torch.no_grad():
        z = gumbel_noise(logits.shape[0], logits.shape[1], seed, logits.device)  # [C, G]
        z.add_(logits.t(), alpha=kappa)
        z.sub_(z.amax(dim=0)).mul_(1.0 / tau)
        torch.nn.functional.threshold_(z, LOG_PROB_CUT, -math.inf).exp_()  # exp(-inf) = 0
        return z.div_(z.sum(dim=0))


def mask_from_probs(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[C, G]`` candidate weights (from :func:`soft_mask_probs`) -> the ``[G, M]`` soft mask ``y.T @ S``.

    Computed candidate-major as ``S.T @ y`` (``[M, G]``, a fast GEMM) and returned as its transposed ``[G, M]``
    view; use ``.reshape`` to change its shape.
    """
    return (candidates.to(probs.dtype).t() @ probs).t()


def soft_mask_logit_grad(
    grad_mask: torch.Tensor, probs: torch.Tensor, candidates: torch.Tensor, tau: float, kappa: float
) -> torch.Tensor:
    """Backward of :func:`soft_mask` by hand: ``dL/dmask [G, M]`` -> ``dL/dlogits [G, C]`` (float32).

    With ``mask = y @ S`` and ``y = softmax((kappa * logits + g) / tau)``: ``dL/dy = dL/dmask @ S.T`` and
    ``dL/dlogits = (kappa / tau) * y * (dL/dy - sum_c y_c dL/dy_c)``. ``probs`` is ``y`` as ``[C, G]``.
    """
    grad_y = candidates.to(torch.float32) @ grad_mask.to(torch.float32).t()  # [C, G]
    grad_y.sub_((grad_y * probs).sum(dim=0))
    return grad_y.mul_(probs).mul_(kappa / tau).t().contiguous()


def pattern_indices(logits: torch.Tensor) -> torch.Tensor:
    """The hard choice per group: ``argmax`` over the candidates, ``[G, C] -> [G]`` (int64)."""
    return logits.argmax(dim=-1)


def hard_mask_from_indices(indices: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[G]`` pattern indices -> ``[G, M]`` 0/1 mask (dtype of ``candidates``)."""
    return candidates[indices]


def hard_mask(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The deterministic eval mask ``S[argmax(logits)]``: ``[G, C] -> [G, M]``, exactly N ones per row."""
    return hard_mask_from_indices(pattern_indices(logits), candidates)


def indices_from_mask(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Invert :func:`hard_mask_from_indices`: a 0/1 mask (``[out, in]`` or ``[G, M]``) -> ``[G]`` indices.

    Raises ``ValueError`` naming the first bad group if the mask is not exactly N:M.
    """
    groups = mask.reshape(-1, m).to(torch.bool)
    kept = groups.sum(dim=-1)
    bad = (kept != n).nonzero()
    if bad.numel():
        g = int(bad[0, 0])
        raise ValueError(
            f"Mask is not {n}:{m} sparse: group {g} keeps {int(kept[g])} of {m} weights "
            f"({int(bad.shape[0])} bad groups of {groups.shape[0]})."
        )
    # Each pattern is a distinct M-bit code; map code -> candidate row.
    powers = 2 ** torch.arange(m, device=mask.device)
    codes = (groups.long() * powers).sum(dim=-1)
    table = torch.full((2**m,), -1, dtype=torch.long, device=mask.device)
    table[(candidate_patterns(n, m, device=mask.device).long() * powers).sum(dim=-1)] = torch.arange(
        num_candidates(n, m), device=mask.device
    )
    return table[codes]


def topn_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights of every group of ``m``: ``[out, in]`` scores -> bool mask.

    This is how every one-shot pruner (magnitude, Wanda, SparseGPT) turns saliency into an N:M mask.
    Ties are broken towards the lower input index, so the result is deterministic.
    """
    check_groupable(scores.shape, m, "scores")
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return keep.view_as(scores)


def prior_logits(
    prior_mask: torch.Tensor,
    n: int,
    m: int,
    alpha: float,
    init_std: float,
    generator: torch.Generator | None = None,
    noise: bool = True,
) -> torch.Tensor:
    """Initial logits that favour a prior N:M mask (MaskLLM's prior formula).

    ``logits = eps + alpha * std(eps) * (P @ S.T - N*N/M)`` with ``eps ~ N(0, init_std^2)``: each candidate
    gets a bonus proportional to how many kept positions it shares with the prior. With ``noise=False`` the
    random part is dropped and ``init_std`` replaces ``std(eps)``: a deterministic encoding of the mask whose
    argmax is exactly the prior (used to rebuild logits from a stored hard mask).

    Args:
        prior_mask: 0/1 mask, ``[out, in]`` or ``[G, M]``, exactly N:M.
        alpha: prior strength (3 in the paper: ~95% of groups start at the prior's pattern).
        init_std: standard deviation of the random logits.
        generator: optional CPU generator for the random part.

    Returns:
        ``[G, C]`` float32 logits on ``prior_mask``'s device.
    """
    groups = prior_mask.reshape(-1, m).to(torch.float32)
    candidates = candidate_patterns(n, m, device=groups.device)
    bonus = groups @ candidates.T - n * n / m  # [G, C]: shared kept positions, centred
    if not noise:
        return alpha * init_std * bonus
    eps = random_logits(groups.shape[0], n, m, init_std, generator).to(groups.device)
    return eps + alpha * eps.std() * bonus


def random_logits(
    num_groups: int, n: int, m: int, init_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Prior-free initial logits ``N(0, init_std^2)``, ``[G, C]`` float32 on the CPU."""
    return torch.randn(num_groups, num_candidates(n, m), generator=generator) * init_std


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of ``m`` along the last dimension: ``[out, in] -> [G]`` (int64)."""
    return (mask.reshape(-1, m) != 0).sum(dim=-1)


def is_n_m_sparse(tensor: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input-dimension entries has at most ``n`` non-zeros.

    "At most" because a kept weight may itself be zero; use :func:`group_counts` on a mask for "exactly".
    """
    return bool((group_counts(tensor, m) <= n).all())
