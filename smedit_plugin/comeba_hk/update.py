"""The consecutive update (paper Eq. 13-15) and MEMIT's residual spreading, as pure float64 functions.

Shapes follow the paper: ``keys`` ``K`` is ``[f, n]`` (one column per request), ``residuals``
``R`` is ``[d, n]`` and a weight update ``Delta`` is ``[d, f]`` (``d_out x d_in``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def solve_spd(a: torch.Tensor, b: torch.Tensor, stored: Optional[torch.dtype] = None) -> torch.Tensor:
    """``a^{-1} b`` for a symmetric positive (semi)definite ``a``: Cholesky, else the pseudo-inverse ``a^+ b``.

    ``C_accu`` is SPD whenever ``lambda * E[kk^T]`` is; a singular covariance (tiny corpus, lambda 0)
    gets the minimum-norm least-squares solution from an eigendecomposition, which is right on every
    device. (LU returns a finite but wrong answer for a numerically singular ``a``, and CUDA's only
    ``lstsq`` driver, ``gels``, assumes full rank.) A non-finite ``a`` gives NaN, which the caller's
    finite check reports with its likely cause. ``stored``: the dtype ``a`` was held in before the float64
    solve (its rounding level decides which eigenvalues count as zero; default ``a``'s own dtype).
    """
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    if not bool(torch.isfinite(a).all()):
        return torch.full_like(b, float("nan"))
    return pinv_solve(a, b, stored or a.dtype)


def pinv_solve(a: torch.Tensor, b: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """``a^+ b`` for a symmetric ``a`` from ``eigh``; memory is two ``n x n`` matrices.

    Eigenvalues within ``n * eps(stored) * max|eigenvalue|`` of 0 count as 0: ``torch.linalg.pinv``'s
    default cutoff, at the rounding level of the dtype ``a`` was stored in (a float32 ``C_accu`` carries
    noise eigenvalues far above float64's).
    """
    values, vectors = torch.linalg.eigh(a)
    cutoff = a.shape[0] * torch.finfo(stored).eps * values.abs().max()
    kept = values.abs() > cutoff
    inverse = torch.where(kept, values.reciprocal(), torch.zeros_like(values))
    logger.warning("the update system C_accu + K K^T is not positive definite (numerical rank %d of %d); using its "
                   "pseudo-inverse (the minimum-norm update). Raise mom2_update_weight, collect more covariance "
                   "samples or set cov_ridge > 0 to make it definite", int(kept.sum()), a.shape[0])
    return vectors @ (inverse[:, None] * (vectors.T @ b))


def consecutive_update(residuals: torch.Tensor, keys: torch.Tensor, c_accu: torch.Tensor) -> torch.Tensor:
    """Eq. 13: ``Delta = R K^T (C_accu + K K^T)^{-1}`` in float64.

    ``c_accu`` is everything seen before this batch (``lambda E[kk^T] + sum_t K_t K_t^T``); with a fresh
    ``c_accu = lambda C0`` this is exactly MEMIT's ``R [(lambda C0 + K K^T)^{-1} K]^T``.
    """
    k = keys.double()
    system = c_accu.double() if c_accu.dtype != torch.float64 else c_accu.clone()  # one float64 f x f copy
    system.add_(k @ k.T)
    solved = solve_spd(system, k, stored=c_accu.dtype)
    return residuals.double() @ solved.T


#: Rows of ``C_accu`` updated at a time by :func:`accumulate_keys` (bounds its float64 temporaries).
ACCUMULATE_ROWS = 1024


def accumulate_keys(c_accu: torch.Tensor, keys: torch.Tensor) -> None:
    """Eq. 15: ``C_accu += K K^T`` in place (summed in float64, stored in ``c_accu``'s dtype).

    Row blocks at a time, so no float64 copy of the whole ``f x f`` matrix is made.
    """
    k = keys.double()
    for start in range(0, c_accu.shape[0], ACCUMULATE_ROWS):
        rows = c_accu[start:start + ACCUMULATE_ROWS]
        rows.copy_((rows.double() + k[start:start + ACCUMULATE_ROWS] @ k.T).to(c_accu.dtype))


def spread_residual(targets: torch.Tensor, current: torch.Tensor, index: int, n_layers: int) -> torch.Tensor:
    """MEMIT's share of the remaining residual for the ``index``-th edited layer: ``(Z - cur) / (|L| - i)``."""
    if not 0 <= index < n_layers:
        raise ValueError(f"layer index {index} outside 0..{n_layers - 1}")
    return (targets.double() - current.double()) / (n_layers - index)


def initial_c_accu(c0: torch.Tensor, weight: float, ridge: float = 0.0, shrinkage: float = 0.0) -> torch.Tensor:
    """``lambda * C0'`` with ``C0' = (1 - rho) C0 + rho tr(C0)/f I + beta I`` (spec 6.3, A19), in float64."""
    c = c0.double()
    f = c.shape[0]
    if shrinkage:  # added on the diagonal: no dense identity (14336^2 float64 is 1.6 GB)
        c = (1.0 - shrinkage) * c
        c.diagonal().add_(shrinkage * (torch.trace(c0.double()) / f))
    if ridge:
        c = c.clone() if c is c0 else c
        c.diagonal().add_(ridge)
    return weight * c if c is c0 else c.mul_(weight)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(0, keepdim=True).sqrt()


def post_norm_residual(residuals: torch.Tensor, current: torch.Tensor, normed: torch.Tensor,
                       gain: torch.Tensor) -> torch.Tensor:
    """Residual in rewrite-output space for blocks that norm the MLP output (Gemma-2/3, spec 5.4 (b)).

    The block adds ``m = g * u / rms(u)`` to the residual stream, not the rewrite output ``u``. For a
    wanted ``m* = m + R`` only the direction of ``m*/g`` is reachable, so the target keeps the
    current magnitude: ``u* = (m*/g) rms(u)/rms(m*/g)``; returns ``u* - u`` (columns are requests).
    ``normed`` is ``m`` for ``current`` = ``u``, ``gain`` is ``g`` (``[d]``).
    """
    g = gain.double()
    g = torch.where(g.abs() < 1e-6, torch.full_like(g, 1e-6), g)[:, None]
    u = current.double()
    wanted = (normed.double() + residuals.double()) / g
    return wanted * _rms(u) / _rms(wanted) - u
