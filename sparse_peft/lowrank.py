"""Low-rank updates of N:M-masked weights: the training-free (EoRA-style) initialisation from calibration inputs.

A mask adapter with ``lora_rank=r`` holds per layer ``B [out, r]`` and ``A [r, in]`` and a scale ``s``; the update
``s * B @ A`` is placed either *under the mask* (effective weight ``(W + s B A) * mask``, exactly N:M after merging)
or as a *dense residual* beside it (``W * mask + s B A``, a small dense matmul at inference).

Both initialisations minimise the layer's output error on calibration inputs ``X [tokens, in]``,
``||(W - W_eff) X^T||_F``, over rank-r updates, measured in the eigenspace of the input covariance
``H = X^T X = Q diag(lam) Q^T`` (EoRA, Liu et al. 2024): for a target update ``T [out, in]`` the best rank-r
``B A`` is the truncated SVD of ``T Q diag(lam)^(1/2)`` mapped back with ``diag(lam)^(-1/2) Q^T``
(:func:`lowrank_factors`; exact by Eckart-Young).

* dense residual: ``T = W - W * mask``, the compression error (EoRA's projection).
* under the mask: only kept weights can change, so ``T`` is the best full-rank change of the kept weights alone,
  the per-row least-squares fit ``min ||(W - (W + D) * mask) X^T||`` (SparseGPT's update solved exactly per row,
  :func:`masked_least_squares_update`); its rank-r approximation ``B A`` then acts through the mask, and ``B`` is
  refitted exactly for that (:func:`refit_masked_b`), since the mask drops the approximation's off-mask part.
"""

from __future__ import annotations

import torch

__all__ = [
    "PLACEMENTS",
    "calibrated_factors",
    "calibrated_target",
    "lowrank_factors",
    "masked_least_squares_update",
    "output_error",
    "refit_masked_b",
]

#: Where the low-rank update acts: ``under_mask`` (``(W + sBA) * mask``, exactly N:M when merged) or
#: ``dense_residual`` (``W * mask + sBA``, kept as a dense path; cannot merge into an N:M weight).
PLACEMENTS = ("under_mask", "dense_residual")


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64 (``damp`` keeps dead input features invertible)."""
    h = hessian.double()
    return h + damp * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def lowrank_factors(
    target: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``B @ A`` closest to ``target`` in the input-covariance norm ``||(T - B A) X^T||_F``.

    Args:
        target: ``[out, in]`` the update to approximate.
        hessian: ``[in, in]`` ``X^T X`` of the layer's calibration inputs (any positive scale).
        rank: ``r``, at most ``min(out, in)``.
        damp: added to ``H``'s eigenvalues as a fraction of their mean (0 for the exact optimum of a full-rank H).

    Returns:
        ``B [out, r]`` and ``A [r, in]`` in float32 on ``target``'s device, balanced (``B = U S^(1/2)``,
        ``A = S^(1/2) V^T diag(lam)^(-1/2) Q^T``).
    """
    if not 0 < rank <= min(target.shape):
        raise ValueError(f"rank must be in 1..{min(target.shape)} for a [{target.shape[0]}, {target.shape[1]}] "
                         f"weight, got {rank}.")
    lam, q = torch.linalg.eigh(_damped(hessian, damp))
    root = lam.clamp(min=0).sqrt()
    u, s, vh = torch.linalg.svd(target.double() @ (q * root), full_matrices=False)
    scale = s[:rank].sqrt()
    b = u[:, :rank] * scale
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    a = (scale[:, None] * vh[:rank]) @ (inv_root[:, None] * q.T)
    return b.float(), a.float()


def masked_least_squares_update(
    weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, rows_per_chunk: int = 64
) -> torch.Tensor:
    """The change ``D`` of the kept weights that best restores the dense output: ``min ||(W - (W + D) * mask) X^T||``.

    Row by row (rows are independent), with ``S`` the kept and ``P`` the pruned inputs of the row:
    ``D_S = H_SS^-1 H_SP W_P`` (damped ``H``), ``D_P = 0``. Every row of an N:M mask keeps the same number of
    weights, so rows are solved in batches of ``rows_per_chunk`` (memory ``rows_per_chunk * k^2`` float32, ``k``
    the kept weights per row).

    Args:
        weight: ``[out, in]``; mask: 0/1 ``[out, in]`` with the same number of ones in every row;
        hessian: ``[in, in]`` ``X^T X``.

    Returns:
        ``D [out, in]`` float32, zero where ``mask`` is 0.
    """
    keep = mask.bool()
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("masked_least_squares_update needs the same number of kept weights in every row (N:M).")
    h = _damped(hessian, damp).float()  # damped, H_SS is well conditioned: float32 solves, 2x faster than float64
    w = weight.float()
    rhs_full = (w * ~keep) @ h  # row i: H @ (w_i on P), i.e. H_:,P W_P (H symmetric)
    kept = keep.nonzero()[:, 1].view(weight.shape[0], -1)  # [out, k] kept columns per row, ascending
    update = torch.zeros_like(w)
    for start in range(0, weight.shape[0], rows_per_chunk):
        idx = kept[start : start + rows_per_chunk]  # [c, k]
        h_ss = h[idx[:, :, None], idx[:, None, :]]  # [c, k, k]
        rhs = rhs_full[start : start + rows_per_chunk].gather(1, idx)  # [c, k]
        chol = torch.linalg.cholesky(h_ss)
        delta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        update[start : start + rows_per_chunk].scatter_(1, idx, delta)
    return update


def refit_masked_b(
    target: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
    rows_per_chunk: int = 64,
) -> torch.Tensor:
    """The ``B [out, r]`` that minimises ``||(T - (B A) * mask) X^T||_F`` for fixed ``A [r, in]``, row by row.

    Row ``i`` sees ``A_i = A * mask_i`` (columns of pruned inputs zeroed): ``b_i = (t_i H A_i^T)(A_i H A_i^T)^-1``,
    with ``H`` damped like everywhere here. Memory: ``rows_per_chunk * r * in`` float64.
    """
    h = _damped(hessian, damp)
    a, t, keep = a.double(), target.double(), mask.double()
    rank = a.shape[0]
    ridge = 1e-10 * torch.eye(rank, dtype=h.dtype, device=h.device)
    b = torch.empty(t.shape[0], rank, dtype=h.dtype, device=h.device)
    for start in range(0, t.shape[0], rows_per_chunk):
        a_rows = a[None] * keep[start : start + rows_per_chunk, None, :]  # [c, r, in]
        a_h = a_rows @ h  # [c, r, in]
        gram = a_h @ a_rows.transpose(1, 2)  # [c, r, r]
        rhs = (a_h @ t[start : start + rows_per_chunk, :, None]).squeeze(-1)  # [c, r]
        b[start : start + rows_per_chunk] = torch.linalg.solve(gram + ridge, rhs)
    return b.float()


def calibrated_target(
    weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, placement: str, damp: float = 0.01
) -> torch.Tensor:
    """The full-rank update ``T [out, in]`` (float32) that the rank-r update at ``placement`` approximates (see the
    module docstring) for ``weight [out, in]``, 0/1 ``mask [out, in]`` and ``hessian [in, in]``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}.")
    weight, mask = weight.float(), mask.float()
    if placement == "dense_residual":
        return weight - weight * mask
    return masked_least_squares_update(weight, mask, hessian, damp)


def calibrated_factors(
    weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, rank: int, placement: str, damp: float = 0.01,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` (see :func:`lowrank_factors`) of the update at ``placement`` with scale 1 (divide ``B`` by the
    adapter's scale). ``target``: :func:`calibrated_target` of the same arguments, if already computed (it does not
    depend on the rank: adapters of several ranks with the same inputs can share it)."""
    if target is None:
        target = calibrated_target(weight, mask, hessian, placement, damp)
    if placement == "dense_residual":
        return lowrank_factors(target, hessian, rank, damp)
    _, a = lowrank_factors(target, hessian, rank, damp)
    weight, mask = weight.float(), mask.float()
    return refit_masked_b(weight - weight * mask, mask, a, hessian, damp), a


def output_error(weight: torch.Tensor, effective: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W_eff) X^T||_F^2 = tr((W - W_eff) H (W - W_eff)^T)`` for ``[out, in]`` weights and ``H = X^T X``."""
    diff = (weight - effective).double()
    return float(((diff @ hessian.double()) * diff).sum())
