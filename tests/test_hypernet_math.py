"""Hyper-network math against autograd and dense solves on tiny float64 shapes (meta-editing spec §1, §9)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from smedit_plugin.hypernet import (EPS_FP32, HyperNet, ModuleCache, RidgeSolve, RunningMeanStd, accumulate_meta_grad,
                                    add_param_shift_, build_hypernets, from_in_out, module_shape,
                                    predict_param_shift, to_in_out, weight_grad_in_out)

F64 = torch.float64


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def dense_shift(keys: torch.Tensor, value_diffs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Reference ``(KᵀK + λI)^-1 Kᵀ D`` with a plain LU solve, differentiable in every input."""
    gram = keys.T @ keys + lam * torch.eye(keys.shape[1], dtype=keys.dtype)
    return torch.linalg.solve(gram, keys.T @ value_diffs)


# ---------------------------------------------------------------- normaliser

def test_normaliser_merge_equals_statistics_of_all_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(41, 5, generator=gen, dtype=F64) * torch.tensor([1.0, 3.0, 0.1, 10.0, 2.0], dtype=F64) + 4.0
    norm = RunningMeanStd(5).double()
    for start, stop in [(0, 1), (1, 1), (1, 8), (8, 9), (9, 30), (30, 41)]:  # single-row and empty batches
        norm.update(rows[start:stop])
        assert torch.isfinite(norm.std).all()
    assert float(norm.n) == 41
    torch.testing.assert_close(norm.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.var, rows.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.std, rows.std(0, unbiased=True), rtol=1e-8, atol=1e-12)
    x = torch.randn(3, 5, generator=gen, dtype=F64)
    torch.testing.assert_close(norm(x), (x - rows.mean(0)) / (rows.std(0) + EPS_FP32), rtol=1e-8, atol=1e-12)


def test_normaliser_starts_as_identity_and_single_row_gives_no_nan() -> None:
    norm = RunningMeanStd(3)
    x = torch.randn(4, 3)
    torch.testing.assert_close(norm(x), x / (1 + EPS_FP32))
    norm.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert not torch.isnan(norm.std).any() and not torch.isnan(norm.mean).any()
    torch.testing.assert_close(norm.mean, torch.tensor([1.0, 2.0, 3.0]))


def test_normaliser_freeze_and_shape_check() -> None:
    norm = RunningMeanStd(2)
    with norm.freeze():
        norm.update(torch.randn(5, 2))
    assert float(norm.n) == 0 and not norm.frozen
    norm.frozen = True
    norm.update(torch.randn(5, 2))
    assert float(norm.n) == 0
    with pytest.raises(ValueError, match="width 2"):
        norm.update(torch.randn(5, 3))


# ---------------------------------------------------------------- network

def test_fresh_network_is_the_normaliser_and_init_matches_spec() -> None:
    torch.manual_seed(0)
    net = HyperNet(6, 4, rank=200, n_blocks=3, n_modules=2, lr_init=1e-6).double()
    rows = torch.randn(50, 10, dtype=F64) * 3 + 1
    net.update_normaliser(rows[:, :6], rows[:, 6:])
    keys, grads = torch.randn(7, 6, dtype=F64), torch.randn(7, 4, dtype=F64)
    pseudo_keys, pseudo_grads = net(keys, grads, 1)
    normalised = net.normaliser(torch.cat([keys, grads], 1))
    torch.testing.assert_close(torch.cat([pseudo_keys, pseudo_grads], 1), normalised, rtol=0, atol=0)
    block = net.blocks[0]
    weights_a = block.A.detach()
    assert abs(float(weights_a.std()) - 1.0) < 0.1 and abs(float(weights_a.mean())) < 0.1  # unscaled N(0, 1)
    assert not block.B.any() and not block.bias.any() and not block.shift.weight.any()
    assert (block.scale.weight == 1).all()
    assert float(net.edit_lr(1).detach()) == pytest.approx(1e-6) and float(net.lam(0).detach()) == 1.0


def test_network_forward_matches_the_block_formula() -> None:
    torch.manual_seed(1)
    net = HyperNet(3, 2, rank=4, n_blocks=2, n_modules=3, lr_init=1e-3).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    net.update_normaliser(torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64))
    keys, grads = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    h = (torch.cat([keys, grads], 1) - net.normaliser.mean) / (net.normaliser.std + EPS_FP32)
    for block in net.blocks:
        h = block.scale.weight[2] * torch.relu(h @ block.A @ block.B + block.bias) + block.shift.weight[2] + h
    pseudo_keys, pseudo_grads = net(keys.float(), grads.float().double(), 2)
    torch.testing.assert_close(pseudo_keys, h[:, :3].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pseudo_grads, h[:, 3:].detach(), rtol=1e-6, atol=1e-6)
    assert pseudo_keys.dtype == F64  # inputs are cast to the network dtype
    with pytest.raises(IndexError, match="module_idx 3"):
        net(keys, grads, 3)
    with pytest.raises(ValueError, match="keys"):
        net(grads, keys, 0)


def test_build_hypernets_shares_by_shape_in_first_occurrence_order() -> None:
    shapes = [(8, 12), (12, 8), (8, 12), (8, 12), (12, 8)]
    nets, module_idx = build_hypernets(shapes, rank=3, n_blocks=2, lr_init=1e-6)
    assert list(nets.keys()) == ["(8, 12)", "(12, 8)"]
    assert module_idx == [0, 0, 1, 2, 1]
    assert nets["(8, 12)"].n_modules == 3 and nets["(12, 8)"].n_modules == 2
    assert nets["(8, 12)"].blocks[1].scale.weight.shape == (3, 20)
    with pytest.raises(ValueError, match="d_in, d_out"):
        build_hypernets([(8, 0)], rank=3, n_blocks=2, lr_init=1e-6)


# ---------------------------------------------------------------- ridge solve

def _solve_problem(n_rows: int, d_in: int, d_out: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_rows, d_in, generator=gen, dtype=F64)
    value_diffs = torch.randn(n_rows, d_out, generator=gen, dtype=F64)
    weight_grad = torch.randn(d_in, d_out, generator=gen, dtype=F64)
    return keys, value_diffs, weight_grad


@pytest.mark.parametrize("n_rows,d_in,form", [(20, 6, "primal"), (5, 9, "dual"), (20, 6, "dual"), (5, 9, "primal")])
def test_ridge_solve_and_backward_match_autograd(n_rows: int, d_in: int, form: str) -> None:
    keys, value_diffs, weight_grad = _solve_problem(n_rows, d_in, 4, seed=n_rows + d_in)
    lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
    diffs = value_diffs.clone().requires_grad_()
    expected_shift = dense_shift(keys, diffs, lam)
    (expected_shift * weight_grad).sum().backward()

    solver = RidgeSolve(keys, lam, dtype=F64, form=form)
    assert solver.form == form and solver.uses_cholesky
    param_shift = solver.solve(value_diffs)
    value_diffs_grad, lam_grad = solver.backward(param_shift, weight_grad)
    assert rel_err(param_shift, expected_shift.detach()) < 1e-10
    assert rel_err(value_diffs_grad, diffs.grad) < 1e-8
    assert abs(float(lam_grad) - float(lam.grad)) < 1e-8 * abs(float(lam.grad))
    # a shift the solver did not produce takes the general dual formula; same answer
    _, lam_grad_general = solver.backward(param_shift.clone(), weight_grad)
    assert abs(float(lam_grad_general) - float(lam.grad)) < 1e-8 * abs(float(lam.grad))


def test_ridge_auto_form_and_dual_equals_primal() -> None:
    keys, value_diffs, weight_grad = _solve_problem(7, 11, 3, seed=3)
    assert RidgeSolve(keys, 1.0, dtype=F64).form == "dual"
    assert RidgeSolve(keys.T.contiguous(), 1.0, dtype=F64).form == "primal"
    primal, dual = RidgeSolve(keys, 0.3, dtype=F64, form="primal"), RidgeSolve(keys, 0.3, dtype=F64, form="dual")
    shift_p, shift_d = primal.solve(value_diffs), dual.solve(value_diffs)
    assert rel_err(shift_d, shift_p) < 1e-10
    grads_p, grads_d = primal.backward(shift_p, weight_grad), dual.backward(shift_d, weight_grad)
    assert rel_err(grads_d[0], grads_p[0]) < 1e-9
    assert abs(float(grads_d[1] - grads_p[1])) < 1e-9 * abs(float(grads_p[1]))


def test_ridge_lu_fallback_agrees_with_cholesky(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, value_diffs, weight_grad = _solve_problem(12, 5, 3, seed=4)
    cholesky = RidgeSolve(keys, 0.5, dtype=F64)
    expected = cholesky.solve(value_diffs), *cholesky.backward(cholesky.solve(value_diffs), weight_grad)

    def not_positive_definite(matrix: torch.Tensor):
        return matrix, torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", not_positive_definite)
    with pytest.warns(RuntimeWarning, match="LU"):
        lu = RidgeSolve(keys, 0.5, dtype=F64)
    assert not lu.uses_cholesky
    shift = lu.solve(value_diffs)
    actual = shift, *lu.backward(shift, weight_grad)
    for a, e in zip(actual, expected):
        assert rel_err(a, e) < 1e-10


def test_ridge_rejects_bad_input_with_field_names() -> None:
    keys = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="lam"):
        RidgeSolve(keys, 0.0)
    with pytest.raises(ValueError, match="keys"):
        RidgeSolve(keys[0], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        RidgeSolve(keys * float("nan"), 1.0)
    solver = RidgeSolve(keys, 1.0, dtype=F64)
    with pytest.raises(ValueError, match="value_diffs"):
        solver.solve(torch.randn(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="weight_grad"):
        solver.backward(torch.randn(3, 2, dtype=F64), torch.randn(4, 2, dtype=F64))


# ---------------------------------------------------------------- predict / meta-gradient

def _random_net(d_in: int, d_out: int, n_modules: int, seed: int) -> HyperNet:
    torch.manual_seed(seed)
    net = HyperNet(d_in, d_out, rank=3, n_blocks=2, n_modules=n_modules, lr_init=0.05).double()
    with torch.no_grad():
        for block in net.blocks:
            block.A.mul_(0.5)
            block.B.copy_(torch.randn_like(block.B) * 0.3)
            block.bias.copy_(torch.randn_like(block.bias) * 0.1)
            block.scale.weight.add_(torch.randn_like(block.scale.weight) * 0.1)
            block.shift.weight.copy_(torch.randn_like(block.shift.weight) * 0.1)
        net.lr.weight.add_(torch.rand_like(net.lr.weight) * 0.05)
        net.lamda.weight.copy_(torch.randn_like(net.lamda.weight) * 0.3)
    net.update_normaliser(torch.randn(30, d_in, dtype=F64) + 1, torch.randn(30, d_out, dtype=F64) * 2)
    return net


def test_fresh_network_prediction_is_ridge_on_normalised_gradient_step() -> None:
    torch.manual_seed(5)
    net = HyperNet(4, 3, rank=8, n_blocks=2, n_modules=1, lr_init=0.1).double()
    keys, value_grads = torch.randn(9, 4, dtype=F64), torch.randn(9, 3, dtype=F64)
    net.update_normaliser(keys, value_grads)
    param_shift, solver = predict_param_shift(net, 0, ModuleCache.of(keys, value_grads), chunk_size=4)
    normalised = net.normaliser(torch.cat([keys, value_grads], 1))
    lr = float(net.edit_lr(0).detach())
    assert lr == pytest.approx(0.1)
    expected_diffs = -lr * (keys * normalised[:, :4]).sum(1, keepdim=True) * normalised[:, 4:]
    assert rel_err(param_shift, dense_shift(keys, expected_diffs, torch.tensor(1.0, dtype=F64))) < 1e-10
    assert solver.lam == 1.0 and param_shift.dtype == F64 and not param_shift.requires_grad


@pytest.mark.parametrize("n_rows,form", [(13, "primal"), (4, "dual")])
def test_accumulated_meta_grad_equals_end_to_end_autograd(n_rows: int, form: str) -> None:
    d_in, d_out, module_idx = 5, 3, 1
    net = _random_net(d_in, d_out, n_modules=2, seed=n_rows)
    gen = torch.Generator().manual_seed(100 + n_rows)
    keys = torch.randn(n_rows, d_in, generator=gen, dtype=F64)
    value_grads = torch.randn(n_rows, d_out, generator=gen, dtype=F64)
    weight0 = torch.randn(d_in, d_out, generator=gen, dtype=F64)
    probe_x, probe_y = torch.randn(6, d_in, generator=gen, dtype=F64), torch.randn(6, d_out, generator=gen, dtype=F64)

    def meta_loss(weight: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(probe_x @ weight) * probe_y).sum() + 0.3 * weight.square().sum()

    pseudo_keys, pseudo_grads = net(keys, value_grads, module_idx)
    value_diffs = -net.edit_lr(module_idx) * (keys * pseudo_keys).sum(1, keepdim=True) * pseudo_grads
    meta_loss(weight0 + dense_shift(keys, value_diffs, net.lam(module_idx))).backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)

    rows = ModuleCache.of(keys, value_grads)
    param_shift, solver = predict_param_shift(net, module_idx, rows, chunk_size=3, form=form)
    assert solver.form == form
    weight = (weight0 + param_shift).requires_grad_()
    meta_loss(weight).backward()
    accumulate_meta_grad(net, module_idx, rows, solver, param_shift, weight.grad, chunk_size=3)
    for name, p in net.named_parameters():
        assert expected[name].abs().sum() > 0, name  # every parameter is on the gradient path
        assert rel_err(p.grad, expected[name]) < 1e-8, name
    assert not net.blocks[0].scale.weight.grad[0].any()  # other modules' embeddings untouched

    accumulate_meta_grad(net, module_idx, rows, solver, param_shift, weight.grad, chunk_size=2)
    for name, p in net.named_parameters():  # accumulates (adds), chunking does not matter
        assert rel_err(p.grad, 2 * expected[name]) < 1e-8, name


def test_prediction_is_independent_of_chunk_size() -> None:
    net = _random_net(4, 6, n_modules=1, seed=7)
    keys, value_grads = torch.randn(11, 4, dtype=F64), torch.randn(11, 6, dtype=F64)
    rows = ModuleCache.of(keys, value_grads)
    whole, _ = predict_param_shift(net, 0, rows, chunk_size=100)
    chunked, _ = predict_param_shift(net, 0, rows, chunk_size=2)
    assert rel_err(chunked, whole) < 1e-12
    with pytest.raises(ValueError, match="chunk_size"):
        predict_param_shift(net, 0, rows, chunk_size=0)
    with pytest.raises(ValueError, match="same N"):
        ModuleCache.of(keys, value_grads[:5])


# ---------------------------------------------------------------- orientation

def _linear_and_conv1d(d_in: int, d_out: int, dtype: torch.dtype) -> tuple[nn.Linear, Conv1D]:
    linear = nn.Linear(d_in, d_out).to(dtype)
    conv = Conv1D(d_out, d_in).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_linear_and_conv1d_orientation_give_identical_math() -> None:
    linear, conv = _linear_and_conv1d(5, 3, F64)
    assert module_shape(linear) == module_shape(conv) == (5, 3)
    torch.testing.assert_close(to_in_out(linear, linear.weight), to_in_out(conv, conv.weight))
    x = torch.randn(4, 5, dtype=F64)
    for module in (linear, conv):
        (module(x) ** 2).sum().backward()
    assert weight_grad_in_out(linear).dtype == torch.float32
    torch.testing.assert_close(weight_grad_in_out(linear), weight_grad_in_out(conv))
    param_shift = torch.randn(5, 3, dtype=F64)
    before = linear(x).detach()
    add_param_shift_(linear, param_shift)
    add_param_shift_(conv, param_shift)
    torch.testing.assert_close(linear(x), conv(x))
    torch.testing.assert_close(linear(x) - before, x @ param_shift.float().double(), rtol=1e-6, atol=1e-6)
    add_param_shift_(linear, param_shift, scale=-1.0)
    torch.testing.assert_close(linear(x).detach(), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_in_out(linear, to_in_out(linear, linear.weight)), linear.weight)


def test_add_param_shift_casts_to_weight_dtype_and_checks_shape() -> None:
    linear = nn.Linear(4, 2).to(torch.bfloat16)
    start = linear.weight.detach().clone()
    add_param_shift_(linear, torch.ones(4, 2), scale=0.5)
    assert linear.weight.dtype == torch.bfloat16
    torch.testing.assert_close(linear.weight.float(), (start.float() + 0.5).bfloat16().float())
    with pytest.raises(ValueError, match="param_shift has shape"):
        add_param_shift_(linear, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no .grad"):
        weight_grad_in_out(linear)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        module_shape(nn.Embedding(3, 4))
