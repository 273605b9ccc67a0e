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
  the per-row least-squares fit ``min ||(W - (W + D) * mask) X^T||`` (SparseGPT's update, solved per row to a
  relative residual, :func:`masked_least_squares_update`); its rank-r approximation ``B A`` then acts through the
  mask, and ``B`` is refitted exactly for that (:func:`refit_masked_b`), since the mask drops the approximation's
  off-mask part.
"""

from __future__ import annotations

import warnings

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
    weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, rtol: float = 1e-2,
    max_iter: int = 1000,
) -> torch.Tensor:
    """The change ``D`` of the kept weights that best restores the dense output: ``min ||(W - (W + D) * mask) X^T||``.

    Row by row (rows are independent), with ``S`` the kept and ``P`` the pruned inputs of the row, the normal
    equations ``H_SS d_S = H_SP w_P`` (damped ``H``), ``D_P = 0``, solved for all rows at once by conjugate gradients
    with the Jacobi preconditioner ``diag(H)``: one ``[out, in] x [in, in]`` float32 GEMM per iteration, until every
    row's residual is at most ``rtol`` times its right-hand side (on SmolLM2-135M's layers, the rank-16 update made
    from ``D`` at ``rtol=1e-2`` has the output error of the one made from the exact solve: benchmarks/README.md).

    Args:
        weight: ``[out, in]``; mask: 0/1 ``[out, in]``;
        hessian: ``[in, in]`` ``X^T X``; rtol: relative residual per row; max_iter: iterations at most (a warning
            names the largest residual left if some row has not reached ``rtol`` by then).

    Returns:
        ``D [out, in]`` float32, zero where ``mask`` is 0.
    """
    h = _damped(hessian, damp).float()  # damped, H_SS is well conditioned: float32 is enough
    keep, w = mask.float(), weight.float()
    residual = ((w * (1 - keep)) @ h) * keep  # row i: (H_SP w_P) on S, the residual of D = 0
    rhs_norm = residual.norm(dim=1)
    inverse_diagonal = keep / h.diagonal()[None, :]  # Jacobi preconditioner, zero off the mask
    update = torch.zeros_like(w)
    z = residual * inverse_diagonal
    direction = z.clone()
    rz = (residual * z).sum(dim=1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(max_iter):
        if bool((residual.norm(dim=1) <= rtol * rhs_norm).all()):
            return update
        h_direction = (direction @ h) * keep
        alpha = rz / (direction * h_direction).sum(dim=1, keepdim=True).clamp(min=tiny)
        update.add_(alpha * direction)
        residual.sub_(alpha * h_direction)
        z = residual * inverse_diagonal
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        direction = z + (rz_next / rz.clamp(min=tiny)) * direction
        rz = rz_next
    left = float((residual.norm(dim=1) / rhs_norm.clamp(min=tiny)).max())
    if left > rtol:
        warnings.warn(f"masked_least_squares_update: {max_iter} iterations left a relative residual of {left:.2g} "
                      f"(rtol {rtol:g}); raise max_iter or damp.", stacklevel=2)
    return update


def refit_masked_b(
    target: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
    rows_per_chunk: int = 64,
) -> torch.Tensor:
    """The ``B [out, r]`` that minimises ``||(T - (B A) * mask) X^T||_F`` for fixed ``A [r, in]``, row by row.

    Row ``i`` sees ``A_i = A * mask_i`` (columns of pruned inputs zeroed): ``b_i = (A_i H A_i^T)^-1 A_i H t_i``, with
    ``H`` damped like everywhere here; float32 products, float64 ``r x r`` solves. Memory: ``rows_per_chunk * r * in``
    float32.
    """
    h = _damped(hessian, damp).float()
    a, keep = a.float(), mask.float()
    h_t = target.float() @ h  # [out, in], row i: H t_i
    rank = a.shape[0]
    ridge = 1e-10 * torch.eye(rank, dtype=torch.float64, device=h.device)
    b = torch.empty(target.shape[0], rank, dtype=torch.float64, device=h.device)
    for start in range(0, target.shape[0], rows_per_chunk):
        a_rows = a[None] * keep[start : start + rows_per_chunk, None, :]  # [c, r, in]
        gram = (a_rows @ h) @ a_rows.transpose(1, 2)  # [c, r, r]
        rhs = (a_rows @ h_t[start : start + rows_per_chunk, :, None]).squeeze(-1)  # [c, r]
        b[start : start + rows_per_chunk] = torch.linalg.solve(gram.double() + ridge, rhs.double())
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
