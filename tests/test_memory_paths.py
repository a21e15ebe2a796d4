"""The memory-saving paths (issue 18) give the results of the plain formulas and still roll back exactly."""
from __future__ import annotations


import pytest
import torch

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
from smedit_plugin.comeba_hk import main as comeba_main
from smedit_plugin.comeba_hk import update
from smedit_plugin.comeba_hk.state import state_parameters
from smedit_plugin.editing import WeightsSnapshot
from smedit_plugin.hypernet.network import RunningMeanStd
from smedit_plugin.testing import tiny_model
from test_comeba_hk_editing import MORE, REQUESTS, _always_firing, _hp


pytestmark = pytest.mark.usefixtures("direct_call_semantics")


def _spd(f: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(f, f + 3, dtype=torch.float64, generator=gen)
    return a @ a.T / (f + 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_block_accumulation_equals_the_whole_matrix_at_once(monkeypatch, dtype) -> None:
    monkeypatch.setattr(update, "ACCUMULATE_ROWS", 3)
    gen = torch.Generator().manual_seed(0)
    c = _spd(8, gen).to(dtype)
    keys = torch.randn(8, 4, dtype=torch.float64, generator=gen)
    expected = (c.double() + keys @ keys.T).to(dtype)
    update.accumulate_keys(c, keys)
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_ridge_and_shrinkage_on_the_diagonal_equal_the_dense_identity_and_leave_c0_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    c0 = _spd(6, gen)
    original = c0.clone()
    eye = torch.eye(6, dtype=torch.float64)
    dense = 2.0 * ((0.7 * c0 + 0.3 * torch.trace(c0) / 6 * eye) + 0.5 * eye)
    torch.testing.assert_close(update.initial_c_accu(c0, 2.0, ridge=0.5, shrinkage=0.3), dense, rtol=0, atol=1e-14)
    torch.testing.assert_close(update.initial_c_accu(c0, 2.0, ridge=0.5), 2.0 * (c0 + 0.5 * eye), rtol=0, atol=1e-14)
    assert torch.equal(c0, original)


def test_normaliser_merge_in_row_chunks_equals_the_float64_formula(monkeypatch) -> None:
    from smedit_plugin.hypernet import network

    monkeypatch.setattr(network, "NORMALISER_ROWS", 4)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 5, generator=gen) * 3 + 1 for n in (7, 1, 10)]
    norm = RunningMeanStd(5)
    for batch in batches:
        norm.update(batch)
    rows = torch.cat(batches).double()
    torch.testing.assert_close(norm.mean, rows.mean(0).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.var, rows.var(0, unbiased=False).float(), rtol=1e-6, atol=1e-6)
    assert float(norm.n) == rows.shape[0]


def test_c_accu_is_cloned_only_for_easyedits_weights_copy(stats_dir: str, monkeypatch) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    hp = _always_firing(_hp(stats_dir))
    apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    captured: list[str] = []
    real_capture = WeightsSnapshot.capture

    def recording_capture(self, name):
        captured.append(name)
        return real_capture(self, name)

    monkeypatch.setattr(WeightsSnapshot, "capture", recording_capture)
    apply_comeba_hk_to_model(model, tok, MORE, hp, return_orig_weights=False)
    assert captured and not [n for n in captured if n.endswith("c_accu")]
    captured.clear()
    _, weights_copy = apply_comeba_hk_to_model(model, tok, MORE, hp, return_orig_weights=True)
    assert {n for n in weights_copy if n.endswith("c_accu")} == {n for n in state_parameters(model) if n.endswith("c_accu")}


def test_a_failure_at_the_end_of_a_step_leaves_the_uncopied_c_accu_untouched(stats_dir: str, monkeypatch) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    hp = _always_firing(_hp(stats_dir))
    apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    before = {n: p.detach().clone() for n, p in state_parameters(model).items()}

    def fail(*args, **kwargs):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(comeba_main, "calibrate_alpha", fail)
    with pytest.raises(RuntimeError, match="calibration failed"):
        apply_comeba_hk_to_model(model, tok, MORE, hp, return_orig_weights=False)
    for name, param in state_parameters(model).items():
        assert torch.equal(param, before[name]), name


def test_edit_time_bp_step_drops_each_modules_rows_and_gives_the_same_shifts() -> None:
    import copy

    from smedit_plugin.hypernet.editor import HypernetEditor
    from smedit_plugin.malmen2.hparams import MALMEN2HyperParams

    modules = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
    model, tok = tiny_model("llama3", n_layers=4)
    other = copy.deepcopy(model)
    hp = MALMEN2HyperParams(model_name="tiny-llama", edit_modules=modules, rank=4, n_blocks=2, lr=1e-2)
    editor = HypernetEditor(model, hp, device=torch.device("cpu"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in editor.nets.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    batches = editor.edit_micro_batches(tok, ["The capital of France is", "Hamlet was written by"], ["Rome", "Marlowe"])
    kept = editor.bp_step(model, batches, 0, update_normaliser=False)
    editor.bind(other)
    dropped = editor.bp_step(other, batches, 0, update_normaliser=False, for_meta_backward=False)
    assert set(kept.caches) == set(kept.solvers) == set(modules)
    assert dropped.caches == {} and dropped.solvers == {}
    for name in modules:
        assert torch.equal(kept.shifts[name], dropped.shifts[name])
        assert torch.equal(model.get_submodule(name).weight, other.get_submodule(name).weight)
