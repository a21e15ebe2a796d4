"""The COMEBA-HK hook multiplies in the model's dtype (a bf16 copy of delta_w kept until it changes) and
scores tokens in float32: same swaps and outputs as the float32 GEMM it replaces, to bf16 rounding."""
from __future__ import annotations

import pytest
import torch

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
from smedit_plugin.comeba_hk import hook_layers as hook_module
from smedit_plugin.comeba_hk.hook_layers import HookLayer
from smedit_plugin.comeba_hk.state import find_state, hook_layers
from smedit_plugin.testing import tiny_model
from test_comeba_hk_editing import REQUESTS, _hp

pytestmark = pytest.mark.usefixtures("direct_call_semantics")
PROMPTS = ["The name of the capital city of France is", "Which family does Ramalinaceae belong to?",
           "The mother tongue of Danielle Darrieux is"]


def _float32_shift(self: HookLayer, keys: torch.Tensor) -> torch.Tensor:
    """The hook's GEMM before: float32 whatever the model's dtype."""
    return torch.nn.functional.linear(keys.float(), self.delta_w.float())


def _logits_and_swaps(model, tok, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the hooked model on ``PROMPTS`` and every hook's swap mask (tokens that got ``delta_w k``)."""
    swaps: list[torch.Tensor] = []
    real = hook_module.swap_mask

    def recording(*args, **kwargs):
        swaps.append(real(*args, **kwargs))
        return swaps[-1]

    monkeypatch.setattr(hook_module, "swap_mask", recording)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    monkeypatch.setattr(hook_module, "swap_mask", real)
    return logits, swaps


def test_bf16_hook_matches_the_float32_gemm(stats_dir: str, monkeypatch) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir))
    layers = hook_layers(model, find_state(model))
    assert all(layer.delta_w.dtype == torch.float32 and layer.delta_w.abs().max() > 0 for layer in layers)
    logits, swaps = _logits_and_swaps(model, tok, monkeypatch)
    monkeypatch.setattr(HookLayer, "shift", _float32_shift)
    reference, reference_swaps = _logits_and_swaps(model, tok, monkeypatch)
    assert any(s.any() for s in reference_swaps), "the edit prompts must reach the hooks"
    for mine, theirs in zip(swaps, reference_swaps, strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(logits, reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))


def test_the_model_dtype_copy_of_delta_w_is_made_once_per_change(stats_dir: str) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    model.to(torch.bfloat16)
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], _hp(stats_dir))
    layer = hook_layers(model, find_state(model))[0]
    keys = torch.randn(2, 3, layer.delta_w.shape[1], dtype=torch.bfloat16)
    first = layer._delta_w_in(torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, layer.delta_w.to(torch.bfloat16))
    layer.shift(keys)
    assert layer._delta_w_in(torch.bfloat16) is first  # reused between forwards
    apply_comeba_hk_to_model(model, tok, REQUESTS[1:], _hp(stats_dir))  # delta_w changes in place
    second = layer._delta_w_in(torch.bfloat16)
    assert second is not first and torch.equal(second, layer.delta_w.to(torch.bfloat16))
    assert not any("cast" in name for name, _ in model.named_parameters())
    assert not any("cast" in name for name in model.state_dict())


def test_a_float32_model_multiplies_delta_w_itself(stats_dir: str) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], _hp(stats_dir))
    layer = hook_layers(model, find_state(model))[0]
    assert layer._delta_w_in(torch.float32) is layer.delta_w
    keys = torch.randn(2, 3, layer.delta_w.shape[1])
    assert torch.equal(layer.shift(keys), _float32_shift(layer, keys))
