"""Edits on bf16/fp16 models: state and updates stay in full precision where rounding would lose them."""
from __future__ import annotations


import pytest
import torch

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
from smedit_plugin.testing import tiny_model
from test_comeba_hk_editing import REQUESTS, _always_firing, _hp


pytestmark = pytest.mark.usefixtures("direct_call_semantics")


@pytest.mark.parametrize("mom2_dtype", ["float32", "float64"])
def test_comeba_hk_state_keeps_its_dtype_and_values_after_model_to_bfloat16(stats_dir: str, mom2_dtype: str) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    apply_comeba_hk_to_model(model, tok, REQUESTS, _always_firing(_hp(stats_dir, mom2_dtype=mom2_dtype)))
    layer = model.model.layers[1].mlp.down_proj.comeba_hook
    saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
    assert saved["delta_w"].abs().max() > 0
    model.to(torch.bfloat16)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert layer.c_accu.dtype == getattr(torch, mom2_dtype)
    for name, p in layer.named_parameters():
        assert p.dtype == saved[name].dtype and torch.equal(p, saved[name]), name
    model.half()
    assert layer.delta_w.dtype == torch.float32 and torch.equal(layer.delta_w, saved["delta_w"])
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], _always_firing(_hp(stats_dir, mom2_dtype=mom2_dtype)))
    assert layer.delta_w.dtype == torch.float32 and not torch.equal(layer.delta_w, saved["delta_w"])


EDIT_MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]


def _bf16_edit(monkeypatch, option):
    """A 2-step MALMEN2 edit of a bf16 tiny model; returns (weights before, shifts added, weights after, report)."""
    from smedit_plugin.hypernet import editor as editor_module
    from smedit_plugin.hypernet.editor import apply_steps
    from smedit_plugin.hypernet.editor import HypernetEditor
    from smedit_plugin.hypernet.shifts import add_param_shift_, from_in_out
    from smedit_plugin.malmen2.hparams import MALMEN2HyperParams

    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    hp = MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4, n_blocks=2, lr=1e-2,
                            bp_steps=2, fp32_edit_weights=option)
    editor = HypernetEditor(model, hp, device=torch.device("cpu"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in editor.nets.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    shifts: dict[str, list[torch.Tensor]] = {name: [] for name in EDIT_MODULES}

    def recording_add(module, param_shift, scale=1.0):
        name = next(n for n in EDIT_MODULES if model.get_submodule(n) is module)
        shifts[name].append(from_in_out(module, param_shift.detach().float() * scale).clone())
        add_param_shift_(module, param_shift, scale)

    monkeypatch.setattr(editor_module, "add_param_shift_", recording_add)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in EDIT_MODULES}
    report = apply_steps(model, tok, editor, ["The capital of France is", "Hamlet was written by"],
                         ["Rome", "Christopher Marlowe"])
    after = {n: model.get_submodule(n).weight.detach().clone() for n in EDIT_MODULES}
    return before, shifts, after, report


def test_bf16_hypernetwork_edit_equals_the_bf16_rounding_of_fp32_weight_plus_fp32_shifts(monkeypatch) -> None:
    before, shifts, after, report = _bf16_edit(monkeypatch, None)
    for name in EDIT_MODULES:
        assert len(shifts[name]) == 2 and after[name].dtype == torch.bfloat16
        exact = before[name].float()
        for shift in shifts[name]:
            exact = exact + shift
        assert torch.equal(after[name], exact.to(torch.bfloat16)), name
        assert 0 < report.relative_error[name] < 10
    # adding each step's shift straight into bf16 weights (the option off) does not give that value
    before, shifts, after, report = _bf16_edit(monkeypatch, False)
    assert not report.relative_error
    mismatched = 0
    for name in EDIT_MODULES:
        exact = before[name].float()
        for shift in shifts[name]:
            exact = exact + shift
        mismatched += int((after[name] != exact.to(torch.bfloat16)).sum())
    assert mismatched > 0


@pytest.mark.parametrize("option", [None, False])
def test_bf16_memit_c_step_rounds_fp32_weight_plus_delta_once(stats_dir: str, monkeypatch, option) -> None:
    from smedit_plugin.comeba_hk import main as comeba_main

    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    deltas = []
    real_update = comeba_main.consecutive_update

    def recording_update(*args):
        deltas.append(real_update(*args))
        return deltas[-1]

    monkeypatch.setattr(comeba_main, "consecutive_update", recording_update)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir, alg_name="MEMIT-C", fp32_edit_weights=option))
    mismatched = 0
    for name, delta in zip(names, deltas):
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        expected = (before[name].float() + delta.float()).to(torch.bfloat16)
        mismatched += int((weight != expected).sum())
    assert (mismatched == 0) == (option is None)


@pytest.mark.parametrize("option,inside", [(None, torch.float32), (False, torch.bfloat16)])
def test_bf16_training_unit_runs_in_float32_edit_weights_and_restores_the_bf16_weights(zsre_train_path, monkeypatch,
                                                                                       option, inside) -> None:
    from smedit_plugin.records import load_records
    from smedit_plugin.hypernet.trainer import MetaTrainer
    from smedit_plugin.malmen2.hparams import MALMEN2HyperParams

    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4, n_blocks=2, lr=1e-3,
                            meta_lr=1e-3, n_edits=2, micro_batch_size=2, max_steps=1, fp32_edit_weights=option)
    trainer = MetaTrainer(model, tok, hp)
    seen: list[torch.dtype] = []
    real_step = trainer.editor.bp_step

    def recording_step(*args, **kwargs):
        seen.extend(model.get_submodule(n).weight.dtype for n in EDIT_MODULES)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.editor, "bp_step", recording_step)
    trainer.train(load_records(zsre_train_path, dataset="zsre", limit=2), progress=False)
    assert seen and set(seen) == {inside}
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, before[name]), name
