"""Edits on bf16/fp16 models: state and updates stay in full precision where rounding would lose them."""
from __future__ import annotations

import math

import pytest
import torch

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
from smedit_plugin.testing import tiny_model
from test_comeba_hk_editing import REQUESTS, _hp


@pytest.fixture(autouse=True)
def direct_call_semantics(monkeypatch):
    from smedit_plugin import editing

    monkeypatch.setattr(editing, "detect_era", lambda **kwargs: None)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("comeba_stats"))


@pytest.mark.parametrize("mom2_dtype", ["float32", "float64"])
def test_comeba_hk_state_keeps_its_dtype_and_values_after_model_to_bfloat16(stats_dir: str, mom2_dtype: str) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir, alpha_z=-math.inf, mom2_dtype=mom2_dtype))
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
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], _hp(stats_dir, alpha_z=-math.inf, mom2_dtype=mom2_dtype))
    assert layer.delta_w.dtype == torch.float32 and not torch.equal(layer.delta_w, saved["delta_w"])
