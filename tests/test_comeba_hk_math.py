"""COMEBA-HK math on tiny shapes: Eq. 13 vs a joint solve, MEMIT's update, the scope test, alpha, C_accu."""
from __future__ import annotations

import math

import pytest
import torch

from smedit_plugin.comeba_hk.scope import (alpha_candidate, max_zscore, next_alpha, swap_mask, zscore_bound,
                                           zscores)
from smedit_plugin.comeba_hk.update import (accumulate_keys, consecutive_update, initial_c_accu, post_norm_residual,
                                            solve_spd, spread_residual)


def _spd(f: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(f, 3 * f, dtype=torch.float64, generator=gen)
    return a @ a.T / (3 * f)


def test_consecutive_steps_equal_one_joint_least_squares_solve() -> None:
    """RLS: S steps of Eq. 13 == argmin lambda tr(dW C0 dW^T) + sum_t ||W K_t - V_t||^2 in closed form."""
    gen = torch.Generator().manual_seed(0)
    d, f, n, steps, lam = 5, 8, 3, 4, 2.5
    w0 = torch.randn(d, f, dtype=torch.float64, generator=gen)
    c0 = _spd(f, gen)
    keys = [torch.randn(f, n, dtype=torch.float64, generator=gen) for _ in range(steps)]
    values = [torch.randn(d, n, dtype=torch.float64, generator=gen) for _ in range(steps)]
    w = w0.clone()
    c_accu = initial_c_accu(c0, lam)
    for k, v in zip(keys, values):
        w = w + consecutive_update(v - w @ k, k, c_accu)
        accumulate_keys(c_accu, k)
    rhs = lam * w0 @ c0 + sum(v @ k.T for k, v in zip(keys, values))
    lhs = lam * c0 + sum(k @ k.T for k in keys)
    joint = torch.linalg.solve(lhs, rhs.T).T
    assert torch.allclose(w, joint, atol=1e-8, rtol=0)
    assert not torch.allclose(w, w0, atol=1e-3)


def test_fresh_state_update_is_memits_update() -> None:
    gen = torch.Generator().manual_seed(1)
    d, f, n, lam = 4, 6, 3, 7.0
    c0 = _spd(f, gen)
    k = torch.randn(f, n, dtype=torch.float64, generator=gen)
    r = torch.randn(d, n, dtype=torch.float64, generator=gen)
    memit = r @ (torch.linalg.inv(lam * c0 + k @ k.T) @ k).T
    assert torch.allclose(consecutive_update(r, k, initial_c_accu(c0, lam)), memit, atol=1e-10)


def test_accumulation_is_exact_in_float64_and_float32_storage_rounds_once() -> None:
    gen = torch.Generator().manual_seed(2)
    f, lam = 6, 3.0
    c0 = _spd(f, gen)
    keys = [torch.randn(f, 2, dtype=torch.float64, generator=gen) for _ in range(5)]
    c64 = initial_c_accu(c0, lam)
    c32 = initial_c_accu(c0, lam).float()
    for k in keys:
        accumulate_keys(c64, k)
        accumulate_keys(c32, k)
    expected = lam * c0 + sum(k @ k.T for k in keys)
    assert torch.allclose(c64, expected, atol=1e-12, rtol=0)
    assert c32.dtype == torch.float32
    assert torch.allclose(c32.double(), expected, rtol=1e-6, atol=1e-6)


def test_solve_spd_falls_back_for_singular_systems() -> None:
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    singular = k @ k.T
    b = singular @ torch.randn(6, 3, dtype=torch.float64, generator=gen)
    x = solve_spd(singular, b)
    assert torch.isfinite(x).all()
    assert torch.allclose(singular @ x, b, atol=1e-8)
    spd = _spd(6, gen)
    assert torch.allclose(solve_spd(spd, b), torch.linalg.solve(spd, b), atol=1e-10)


def test_ridge_and_shrinkage() -> None:
    gen = torch.Generator().manual_seed(4)
    c0 = _spd(5, gen)
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(initial_c_accu(c0, 2.0, ridge=0.5), 2.0 * (c0 + 0.5 * eye))
    shrunk = initial_c_accu(c0, 1.0, shrinkage=1.0)
    assert torch.allclose(shrunk, torch.trace(c0) / 5 * eye)
    assert torch.allclose(torch.trace(initial_c_accu(c0, 1.0, shrinkage=0.3)), torch.trace(c0))


def test_spread_residual_gives_the_last_layer_what_is_left() -> None:
    z, cur = torch.tensor([[4.0]]), torch.tensor([[1.0]])
    assert [float(spread_residual(z, cur, i, 3)) for i in range(3)] == [1.0, 1.5, 3.0]
    with pytest.raises(ValueError):
        spread_residual(z, cur, 3, 3)


def test_zscores_match_torch_std_per_sequence() -> None:
    gen = torch.Generator().manual_seed(5)
    m = torch.rand(3, 7, generator=gen)
    valid = torch.ones(3, 7, dtype=torch.bool)
    for ddof in (0, 1):
        expected = (m - m.mean(-1, keepdim=True)) / m.std(-1, keepdim=True, correction=ddof)
        assert torch.allclose(zscores(m, valid, ddof), expected, atol=1e-6)
    assert torch.allclose(max_zscore(m, valid), zscores(m, valid).amax(-1))


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 10, 40])
def test_zscore_bound_is_reached_by_one_outlier_and_never_exceeded(n: int) -> None:
    m = torch.zeros(1, n)
    m[0, 3 % n] = 5.0
    valid = torch.ones(1, n, dtype=torch.bool)
    assert float(max_zscore(m, valid)) == pytest.approx((n - 1) / math.sqrt(n), rel=1e-5)
    assert zscore_bound(n) == pytest.approx((n - 1) / math.sqrt(n))
    gen = torch.Generator().manual_seed(n)
    noisy = torch.rand(200, n, generator=gen) ** 4
    assert float(max_zscore(noisy, valid.expand(200, n)).max()) <= zscore_bound(n) + 1e-5
    assert bool(swap_mask(m, valid, 2.2).any()) == (n >= 7)


def test_undefined_zscores_never_swap() -> None:
    one = torch.tensor([[3.0]])
    assert not swap_mask(one, torch.ones(1, 1, dtype=torch.bool), -math.inf).any()
    const = torch.full((2, 9), 0.25)
    assert not swap_mask(const, torch.ones(2, 9, dtype=torch.bool), -math.inf).any()
    zero = torch.zeros(1, 9)
    assert not swap_mask(zero, torch.ones(1, 9, dtype=torch.bool), -math.inf).any()
    assert torch.isnan(max_zscore(const, torch.ones(2, 9, dtype=torch.bool))).all()
    assert alpha_candidate(torch.tensor([float("nan")])) is None


def test_masked_tokens_neither_count_nor_swap() -> None:
    m = torch.tensor([[0.1, 0.2, 0.1, 5.0, 0.2, 0.1, 0.15, 0.1, 9.0, 9.0]])
    valid = torch.tensor([[True] * 8 + [False, False]])
    alone = swap_mask(m[:, :8], valid[:, :8], 2.2)
    padded = swap_mask(m, valid, 2.2)
    assert torch.equal(padded[:, :8], alone) and not padded[:, 8:].any()
    assert bool(alone[0, 3])
    assert torch.allclose(zscores(m, valid)[:, :8], zscores(m[:, :8], valid[:, :8]))


def test_alpha_never_increases_and_is_the_running_minimum() -> None:
    gen = torch.Generator().manual_seed(6)
    alpha, seen = 2.2, [2.2]
    for _ in range(20):
        candidate = alpha_candidate(max_zscore(torch.rand(4, 8, generator=gen) ** 3, torch.ones(4, 8, dtype=torch.bool)))
        new = next_alpha(alpha, candidate)
        assert new <= alpha
        seen.append(candidate)
        alpha = new
        assert alpha == min(seen)
    assert next_alpha(1.5, None) == 1.5


def test_post_norm_residual_reaches_any_reachable_normed_output() -> None:
    """Gemma-style blocks add g*u/rms(u): the mapped residual makes the normed output hit m + R exactly."""
    gen = torch.Generator().manual_seed(7)
    d, n = 6, 3
    gain = 1.0 + torch.rand(d, dtype=torch.float64, generator=gen)

    def norm(u: torch.Tensor) -> torch.Tensor:
        return gain[:, None] * u / u.pow(2).mean(0, keepdim=True).sqrt()

    u = torch.randn(d, n, dtype=torch.float64, generator=gen)
    goal = norm(torch.randn(d, n, dtype=torch.float64, generator=gen))
    shift = post_norm_residual(goal - norm(u), u, norm(u), gain)
    assert torch.allclose(norm(u + shift), goal, atol=1e-10)
    assert torch.allclose((u + shift).pow(2).mean(0), u.pow(2).mean(0))
    assert torch.allclose(post_norm_residual(torch.zeros(d, n, dtype=torch.float64), u, norm(u), gain),
                          torch.zeros(d, n, dtype=torch.float64), atol=1e-12)
