"""The consecutive update (paper Eq. 13-15) and MEMIT's residual spreading, as pure float64 functions.

Shapes follow the paper: ``keys`` ``K`` is ``[f, n]`` (one column per request), ``residuals``
``R`` is ``[d, n]`` and a weight update ``Delta`` is ``[d, f]`` (``d_out x d_in``).
"""
from __future__ import annotations

import torch


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^{-1} b`` for a symmetric positive (semi)definite ``a``: Cholesky, else LU, else least squares.

    ``C_accu`` is SPD whenever ``lambda * E[kk^T]`` is; a singular covariance (tiny corpus, lambda 0)
    falls through to the more tolerant solvers instead of failing.
    """
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    solution, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and torch.isfinite(solution).all():
        return solution
    return torch.linalg.lstsq(a, b).solution


def consecutive_update(residuals: torch.Tensor, keys: torch.Tensor, c_accu: torch.Tensor) -> torch.Tensor:
    """Eq. 13: ``Delta = R K^T (C_accu + K K^T)^{-1}`` in float64.

    ``c_accu`` is everything seen before this batch (``lambda E[kk^T] + sum_t K_t K_t^T``); with a fresh
    ``c_accu = lambda C0`` this is exactly MEMIT's ``R [(lambda C0 + K K^T)^{-1} K]^T``.
    """
    k = keys.double()
    system = c_accu.double() if c_accu.dtype != torch.float64 else c_accu.clone()  # one float64 f x f copy
    system.add_(k @ k.T)
    solved = solve_spd(system, k)
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
