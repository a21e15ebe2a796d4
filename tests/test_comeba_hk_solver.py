"""The update solve on a singular ``C_accu + K K^T``: the pseudo-inverse answer on every device.

CUDA's only ``torch.linalg.lstsq`` driver is ``gels``, which assumes full rank, and an LU solve of a
numerically singular matrix returns a finite but wrong answer without reporting it. These tests run
the solver with CUDA's semantics forced on CPU and compare with a float64 ``pinv`` solution.
"""
from __future__ import annotations

import logging

import pytest
import torch

from smedit_plugin.comeba_hk.update import consecutive_update, solve_spd


def _rank_deficient(f: int = 48, rank: int = 12, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``rank`` PSD ``C_accu`` (covariance of ``rank`` directions, lambda 0) and keys in its span."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(f, rank, dtype=torch.float64, generator=gen)
    c_accu = basis @ basis.T
    keys = basis @ torch.randn(rank, n, dtype=torch.float64, generator=gen)
    return c_accu, keys


def _pinv_update(residuals: torch.Tensor, keys: torch.Tensor, c_accu: torch.Tensor) -> torch.Tensor:
    """The reference: float64 ``pinv`` with its default cutoff at ``C_accu``'s storage precision."""
    system = c_accu.double() + keys @ keys.T
    rtol = system.shape[0] * torch.finfo(c_accu.dtype).eps
    return residuals @ (torch.linalg.pinv(system, hermitian=True, rtol=rtol) @ keys).T


@pytest.fixture
def cuda_lstsq(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.linalg.lstsq`` as on CUDA: the ``gels`` driver whatever the caller asks for."""
    original = torch.linalg.lstsq

    def gels(a, b, rcond=None, *, driver=None):
        return original(a, b, rcond=rcond, driver="gels")

    monkeypatch.setattr(torch.linalg, "lstsq", gels)


def test_the_cuda_lstsq_driver_and_lu_give_garbage_on_this_system() -> None:
    """Why the fallback changed: both of the old fallbacks are far from the pseudo-inverse solution here."""
    c_accu, keys = _rank_deficient()
    system = c_accu + keys @ keys.T
    expected = torch.linalg.pinv(system, hermitian=True) @ keys
    assert int(torch.linalg.cholesky_ex(system).info) != 0
    gels = torch.linalg.lstsq(system, keys, driver="gels").solution
    lu, info = torch.linalg.solve_ex(system, keys)
    assert (gels - expected).norm() > expected.norm()
    assert int(info) == 0 and bool(torch.isfinite(lu).all())  # LU reports nothing ...
    assert (lu - expected).norm() > expected.norm()  # ... and is wrong


@pytest.mark.usefixtures("cuda_lstsq")
@pytest.mark.parametrize("rank", [1, 12, 47])
def test_singular_system_gets_the_pseudo_inverse_solution_with_cuda_semantics(rank: int, caplog) -> None:
    c_accu, keys = _rank_deficient(rank=rank, n=min(rank, 6))
    residuals = torch.randn(10, keys.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _pinv_update(residuals, keys, c_accu)
    with caplog.at_level(logging.WARNING, logger="smedit_plugin.comeba_hk.update"):
        delta = consecutive_update(residuals, keys, c_accu)
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))
    assert f"numerical rank {rank} of 48" in caplog.text and "cov_ridge" in caplog.text


def test_float32_c_accu_singular_system_matches_the_float64_pseudo_inverse() -> None:
    """``C_accu`` stored in float32 (``mom2_dtype: float32``): its rounding noise is not taken for signal."""
    c_accu, keys = _rank_deficient(rank=20)
    residuals = torch.randn(10, keys.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    delta = consecutive_update(residuals, keys, c_accu.float())
    expected = _pinv_update(residuals, keys, c_accu.float())
    assert int(torch.linalg.matrix_rank(c_accu.float().double() + keys @ keys.T)) > 20  # float64's cutoff sees noise
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))


def test_definite_system_keeps_the_cholesky_answer(caplog) -> None:
    c_accu, keys = _rank_deficient(rank=48)
    c_accu.diagonal().add_(1.0)
    with caplog.at_level(logging.WARNING, logger="smedit_plugin.comeba_hk.update"):
        solution = solve_spd(c_accu + keys @ keys.T, keys)
    torch.testing.assert_close(solution, torch.linalg.solve(c_accu + keys @ keys.T, keys), rtol=1e-9, atol=1e-12)
    assert not caplog.text


def test_non_finite_system_gives_nan_for_the_callers_finite_check() -> None:
    c_accu, keys = _rank_deficient()
    c_accu[0, 0] = float("nan")
    assert torch.isnan(solve_spd(c_accu, keys)).all()
