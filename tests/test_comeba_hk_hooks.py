"""Hook layers on a tiny random Llama: no-op when empty, scope test masking, padding invariance, deep copies."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from smedit_plugin.comeba_hk.hook_layers import HOOK_ATTR, HookLayer
from smedit_plugin.comeba_hk.scope import max_zscore
from smedit_plugin.comeba_hk.state import attach_state, find_state, hook_layers, remove_hook_layers, set_mode
from smedit_plugin.testing import tiny_model
from smedit_plugin.tfcompat import cache_keyword, returned_cache

NAMES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
TEXTS = ["The capital city of France is Paris and has been for a long time",
         "Which family does Ramalinaceae belong to?", "Hi"]


def _hooked(alpha: float, delta_scale: float, mask_bos: bool = True, bos_id=None, seed: int = 0):
    model, tok = tiny_model("llama3", n_layers=4)
    info = {"alg_name": "COMEBA-HK", "layers": [1, 2], "rewrite_modules": NAMES, "templates": [["{}"]],
            "bos_id": bos_id, "fingerprint": "test"}
    f = model.config.intermediate_size
    attach_state(model, info, [torch.eye(f) for _ in NAMES], alpha, 1, True, mask_bos)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hook_layers(model, find_state(model)):
            layer.delta_w.copy_(delta_scale * torch.randn(layer.delta_w.shape, generator=gen))
    return model, tok


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


@pytest.mark.parametrize("mode", ["validated", "temporary", "recording", "calibrating", "off"])
def test_empty_hooks_are_bit_identical_in_every_mode(mode: str) -> None:
    model, tok = _hooked(alpha=2.2, delta_scale=0.0)
    plain, _ = tiny_model("llama3", n_layers=4)
    set_mode(hook_layers(model, find_state(model)), mode)
    for text in TEXTS:
        assert torch.equal(_logits(model, _ids(tok, text)), _logits(plain, _ids(tok, text)))


def test_single_token_inputs_and_decoding_steps_are_never_modified() -> None:
    model, tok = _hooked(alpha=-math.inf, delta_scale=1.0)
    plain, _ = tiny_model("llama3", n_layers=4)
    one = torch.tensor([[tok("Paris", add_special_tokens=False)["input_ids"][0]]])
    assert torch.equal(_logits(model, one), _logits(plain, one))
    ids = _ids(tok, TEXTS[1])
    assert not torch.allclose(_logits(model, ids), _logits(plain, ids), atol=1e-4)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        step = torch.tensor([[out.logits[0, -1].argmax()]])
        cached = model(input_ids=step, use_cache=True, **{cache_keyword(model): returned_cache(model, out)}).logits
        full = model(input_ids=torch.cat([ids, step], 1)).logits[:, -1:]
    assert not torch.allclose(cached, full, atol=1e-4), "the prefill is edited, the decoding step alone is not"


def test_validated_swaps_only_high_zscore_tokens_temporary_swaps_all() -> None:
    model, tok = _hooked(alpha=1.5, delta_scale=0.5)
    plain, _ = tiny_model("llama3", n_layers=4)
    layers = hook_layers(model, find_state(model))
    ids = _ids(tok, TEXTS[0])
    seen = {}

    def probe(name):
        def hook(_m, args, out):
            seen[name] = out.detach().clone()
            if name == "hooked" and layers[0].mode == "validated":  # the test tools outside the hook use
                seen["swapped"] = layers[0].swapped(layers[0].shift(args[0]))
        return hook

    handles = [model.get_submodule(NAMES[0]).register_forward_hook(probe("hooked")),
               plain.get_submodule(NAMES[0]).register_forward_hook(probe("plain"))]
    _logits(model, ids)
    _logits(plain, ids)
    changed = (seen["hooked"] != seen["plain"]).any(-1)[0]
    assert 0 < int(changed.sum()) < ids.shape[1] // 2
    assert torch.equal(seen["swapped"][0], changed)
    set_mode(layers, "temporary")
    _logits(model, ids)
    assert bool((seen["hooked"] != seen["plain"]).any(-1).all())
    for h in handles:
        h.remove()


def test_unknown_hook_mode_is_refused_and_modes_stay() -> None:
    model, _ = _hooked(alpha=2.2, delta_scale=0.5)
    layers = hook_layers(model, find_state(model))
    with pytest.raises(ValueError, match="hook mode"):
        set_mode(layers, "validate")
    assert [layer.mode for layer in layers] == ["validated", "validated"]


def test_calibrating_records_under_validated_upstream_hooks_and_edits_like_validated() -> None:
    """Spec A12: recording sees unedited upstream keys, calibrating the keys the edited model produces."""
    model, tok = _hooked(alpha=1.2, delta_scale=0.5)
    layers = hook_layers(model, find_state(model))
    ids = _ids(tok, TEXTS[0])
    keys = {}
    handle = model.get_submodule(NAMES[1]).register_forward_pre_hook(
        lambda _m, args: keys.__setitem__("second", args[0].detach().clone()))
    recorded = {}
    for mode in ("recording", "calibrating", "validated"):
        set_mode(layers, mode)
        recorded[mode] = (_logits(model, ids), [list(layer.recorded) for layer in layers], keys["second"])
    handle.remove()
    plain, _ = tiny_model("llama3", n_layers=4)
    assert torch.equal(recorded["recording"][0], _logits(plain, ids))
    assert torch.equal(recorded["calibrating"][0], recorded["validated"][0])
    assert recorded["validated"][1] == [[], []]
    first_rec, second_rec = recorded["recording"][1]
    first_cal, second_cal = recorded["calibrating"][1]
    assert torch.equal(first_rec[0], first_cal[0]), "nothing upstream of the first hook layer"
    valid = torch.ones(1, ids.shape[1], dtype=torch.bool)
    for mode, second in (("calibrating", second_cal), ("recording", second_rec)):
        norms = torch.linalg.vector_norm(layers[1].shift(recorded[mode][2]), dim=-1)
        assert torch.allclose(second[0], max_zscore(norms, valid, 1))
    assert not torch.allclose(second_cal[0], second_rec[0]), "upstream swaps change the second layer's keys"


@pytest.mark.parametrize("side", ["right", "left"])
def test_swaps_do_not_depend_on_padding(side: str) -> None:
    model, tok = _hooked(alpha=1.2, delta_scale=0.5)
    plain, _ = tiny_model("llama3", n_layers=4)
    seqs = [tok(t)["input_ids"] for t in TEXTS[:2]]
    width = max(map(len, seqs))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq)
        mask[row, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = _logits(model, ids, mask, positions)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        alone = _logits(model, torch.tensor([seq]))
        assert torch.allclose(batched[row, span], alone[0], atol=1e-4)
        assert not torch.allclose(alone, _logits(plain, torch.tensor([seq])), atol=1e-3)


def test_bos_is_left_out_of_the_statistics() -> None:
    model, tok = _hooked(alpha=-math.inf, delta_scale=0.5, bos_id=None)
    ids = _ids(tok, TEXTS[1])
    first = ids[0, 0].item()
    masked, _ = _hooked(alpha=-math.inf, delta_scale=0.5, bos_id=first)
    plain, _ = tiny_model("llama3", n_layers=4)
    seen = {}

    def probe(name):
        def hook(_m, args, out):
            seen[name] = out.detach().clone()
            if name == "hooked" and layers[0].mode == "validated":  # the test tools outside the hook use
                seen["swapped"] = layers[0].swapped(layers[0].shift(args[0]))
        return hook

    for name, m in (("all", model), ("masked", masked), ("plain", plain)):
        m.get_submodule(NAMES[0]).register_forward_hook(probe(name))
        _logits(m, ids)
    assert not torch.equal(seen["all"][0, 0], seen["plain"][0, 0])
    assert torch.equal(seen["masked"][0, 0], seen["plain"][0, 0])
    assert not torch.equal(seen["masked"][0, 1:], seen["plain"][0, 1:])


def test_state_parameters_are_named_frozen_and_deep_copies_are_independent() -> None:
    model, tok = _hooked(alpha=-math.inf, delta_scale=0.5)
    plain, _ = tiny_model("llama3", n_layers=4)
    names = dict(model.named_parameters())
    for base in NAMES:
        for part in ("delta_w", "c_accu", "alpha"):
            assert not names[f"{base}.{HOOK_ATTR}.{part}"].requires_grad
    assert "comeba_hk_state.steps" in names
    assert set(dict(plain.named_parameters())) <= set(names)
    twin = copy.deepcopy(model)
    ids = _ids(tok, TEXTS[1])
    assert torch.equal(_logits(twin, ids), _logits(model, ids))
    assert remove_hook_layers(twin) and not remove_hook_layers(twin)
    assert torch.equal(_logits(twin, ids), _logits(plain, ids))
    assert not torch.equal(_logits(model, ids), _logits(plain, ids))
    assert isinstance(getattr(model.get_submodule(NAMES[0]), HOOK_ATTR), HookLayer)
