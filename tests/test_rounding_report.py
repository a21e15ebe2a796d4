"""The rounding of every bf16 edit is measured, kept (``last_rounding``) and logged at WARNING when it eats the update."""
from __future__ import annotations

import logging

import pytest
import torch

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
from smedit_plugin.hypernet.editor import HypernetEditor, apply_steps
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.precision import ROUNDING_WARN, last_rounding
from smedit_plugin.testing import tiny_model
from test_comeba_hk_editing import REQUESTS, _hp

pytestmark = pytest.mark.usefixtures("direct_call_semantics")
EDIT_MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]
PROMPTS, TARGETS = ["The capital of France is", "Hamlet was written by"], ["Rome", "Christopher Marlowe"]


def _relative_error(before: torch.Tensor, exact: torch.Tensor, after: torch.Tensor) -> float:
    return float((after.detach().float() - exact).norm() / (exact - before.float()).norm())


def _bf16_hypernet_edit(lr: float, caplog):
    """A 2-step MALMEN2 edit of a bf16 tiny model whose networks step by ``lr``; returns what the edit did."""
    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    editor = HypernetEditor(model, MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4,
                                                      n_blocks=2, lr=lr, bp_steps=2), device=torch.device("cpu"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in editor.nets.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
        for nets in editor.nets:
            for net in nets.values():
                net.lr.weight.fill_(lr)
    with caplog.at_level(logging.INFO, logger="smedit_plugin"):
        report = apply_steps(model, tok, editor, PROMPTS, TARGETS)
    return model, report


def test_a_small_bf16_hypernetwork_update_is_reported_and_warned_about_with_the_fix(caplog) -> None:
    model, report = _bf16_hypernet_edit(1e-6, caplog)
    assert last_rounding(model) is report and report.dtype == torch.bfloat16
    assert set(report.relative_error) == set(EDIT_MODULES)
    assert report.above() and max(report.relative_error.values()) > ROUNDING_WARN
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "MALMEN2" in message and "lost" in message and "`lr`" in message and "float32" in message


def test_a_large_bf16_hypernetwork_update_is_reported_without_a_warning(caplog) -> None:
    model, report = _bf16_hypernet_edit(100.0, caplog)
    assert last_rounding(model) is report and report.relative_error
    assert not report.above(), report.relative_error
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("rounded back to torch.bfloat16 once" in r.getMessage() for r in caplog.records)


def test_float32_edits_report_no_rounding(caplog) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    editor = HypernetEditor(model, MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4,
                                                      n_blocks=2, lr=1e-6, bp_steps=2))
    with caplog.at_level(logging.INFO, logger="smedit_plugin"):
        report = apply_steps(model, tok, editor, PROMPTS, TARGETS)
    assert not report.relative_error and last_rounding(model) is report
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_memit_c_step_keeps_its_rounding_report_and_warns_when_the_delta_is_small(stats_dir: str, monkeypatch, caplog,
                                                                                 scale: float) -> None:
    """``apply_comeba_hk_to_model`` used to drop the report: now ``last_rounding`` holds the error of each layer's
    update, the same as measured from the weights (delta scaled by ``scale`` to make it small)."""
    from smedit_plugin.comeba_hk import main as comeba_main

    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    deltas = []
    real_update = comeba_main.consecutive_update

    def scaled_update(*args):
        deltas.append(real_update(*args) * scale)
        return deltas[-1]

    monkeypatch.setattr(comeba_main, "consecutive_update", scaled_update)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    with caplog.at_level(logging.INFO, logger="smedit_plugin"):
        apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir, alg_name="MEMIT-C"))
    report = last_rounding(model)
    assert report.dtype == torch.bfloat16 and list(report.relative_error) == names
    for name, delta in zip(names, deltas):
        exact = before[name].float() + delta.float()
        measured = _relative_error(before[name], exact, model.get_submodule(name).weight)
        assert report.relative_error[name] == pytest.approx(measured, rel=1e-4)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "rounding" in r.getMessage()]
    assert bool(warned) == bool(report.above())
    if scale < 1:
        assert warned and "MEMIT-C" in warned[0] and "float32" in warned[0] and "COMEBA-HK" in warned[0]
