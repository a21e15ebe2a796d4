"""WeightsSnapshot, edit_transaction and the era-dependent ``weights_copy`` (contract §1.3) on tiny models."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from smedit_plugin import easyedit, editing
from smedit_plugin.editing import WeightsSnapshot, edit_transaction, maybe_copy_model, weights_copy_for_easyedit


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight`` and uses Conv1D in its MLP."""
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    for name, value in before.items():
        assert now[name].dtype == value.dtype, name
        assert torch.equal(now[name], value), f"{name} was not restored bit-exactly"


@torch.no_grad()
def perturb(model: torch.nn.Module, names: list[str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        params[name].add_(torch.randn_like(params[name]) * 0.5)


def test_restore_is_bit_exact_for_captured_parameters() -> None:
    model = tiny_llama()
    before = state(model)
    snapshot = WeightsSnapshot(model)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for name in names:
        assert snapshot.capture(name) == name
    perturb(model, names)
    assert not torch.equal(model.state_dict()[names[0]], before[names[0]])
    snapshot.restore()
    assert_same(model, before)
    assert snapshot.names == tuple(names)


def test_capture_clones_once_before_the_first_change() -> None:
    model = tiny_llama()
    name = "model.layers.1.mlp.up_proj.weight"
    original = model.state_dict()[name].clone()
    snapshot = WeightsSnapshot(model)
    snapshot.capture(name)
    perturb(model, [name])
    snapshot.capture(name)  # a second capture after the change must keep the pre-edit value
    copy = snapshot.as_weights_copy()
    assert list(copy) == [name]
    assert torch.equal(copy[name], original)
    assert not copy[name].requires_grad
    assert copy[name].data_ptr() != dict(model.named_parameters())[name].data_ptr()


def test_capture_module_uses_the_weight_parameter_name() -> None:
    model = tiny_gpt2()
    snapshot = WeightsSnapshot(model)
    assert snapshot.capture_module("transformer.h.1.mlp.c_proj") == "transformer.h.1.mlp.c_proj.weight"
    with pytest.raises(LookupError, match="no submodule"):
        snapshot.capture_module("transformer.h.9.mlp")
    with pytest.raises(LookupError, match="no .weight"):
        snapshot.capture_module("transformer.h.0.mlp.act")


def test_unknown_parameter_name_raises_lookup_error() -> None:
    snapshot = WeightsSnapshot(tiny_llama())
    with pytest.raises(LookupError, match="named_parameters"):
        snapshot.capture("model.layers.0.mlp.down_proj")  # a module name, not a parameter name


@pytest.mark.parametrize("build, alias, first", [
    (tiny_gpt2, "lm_head.weight", "transformer.wte.weight"),
    (lambda: tiny_llama(tie=True), "lm_head.weight", "model.embed_tokens.weight"),
])
def test_tied_weights_are_stored_once_under_the_first_registered_name(build, alias, first) -> None:
    model = build()
    assert first in dict(model.named_parameters()) and alias not in dict(model.named_parameters())
    before = state(model)
    snapshot = WeightsSnapshot(model)
    assert snapshot.capture(alias) == first
    assert snapshot.capture_module("lm_head") == first
    assert snapshot.capture(first) == first
    perturb(model, [alias])
    assert list(snapshot.as_weights_copy()) == [first]
    assert torch.equal(snapshot.as_weights_copy()[first], before[first])
    snapshot.restore()
    assert_same(model, before)


def test_restore_follows_a_later_dtype_change() -> None:
    model = tiny_llama()
    name = "model.layers.0.mlp.gate_proj.weight"
    original = model.state_dict()[name].clone()
    snapshot = WeightsSnapshot(model)
    snapshot.capture(name)
    model.double()
    perturb(model, [name])
    snapshot.restore()
    restored = model.state_dict()[name]
    assert restored.dtype == torch.float64
    assert torch.equal(restored, original.double())


def test_bf16_parameters_restore_bit_exactly() -> None:
    model = tiny_llama().to(torch.bfloat16)
    before = state(model)
    names = ["model.layers.1.mlp.down_proj.weight"]
    with edit_transaction(model) as snapshot:
        snapshot.capture(names[0])
        perturb(model, names)
    assert snapshot.as_weights_copy()[names[0]].dtype == torch.bfloat16
    snapshot.restore()
    assert_same(model, before)


def test_transaction_restores_every_captured_tensor_on_error_and_reraises() -> None:
    model = tiny_gpt2()
    before = state(model)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"]
    with pytest.raises(RuntimeError, match="solver diverged"):
        with edit_transaction(model) as snapshot:
            for name in names:
                snapshot.capture(name)
            perturb(model, names)
            raise RuntimeError("solver diverged")
    assert_same(model, before)


def test_transaction_keeps_the_edit_when_the_body_succeeds() -> None:
    model = tiny_gpt2()
    name = "transformer.h.0.mlp.c_fc.weight"
    original = model.state_dict()[name].clone()
    with edit_transaction(model) as snapshot:
        snapshot.capture(name)
        perturb(model, [name])
    assert not torch.equal(model.state_dict()[name], original)
    assert torch.equal(snapshot.as_weights_copy()[name], original)


def _edited_snapshot() -> WeightsSnapshot:
    model = tiny_gpt2()
    with edit_transaction(model) as snapshot:
        snapshot.capture("transformer.h.0.mlp.c_fc.weight")
        perturb(model, ["transformer.h.0.mlp.c_fc.weight"])
    return snapshot


def _expected(era, return_orig_weights: bool, keep_original_weight: bool) -> bool:
    """Whether the copy (rather than ``{}``) is due, per contract §1.3."""
    if not return_orig_weights:
        return False
    return keep_original_weight if era == "A" else True


def _check_semantics(era) -> None:
    snapshot = _edited_snapshot()
    for return_orig_weights in (True, False):
        for keep_original_weight in (True, False):
            result = weights_copy_for_easyedit(snapshot, return_orig_weights=return_orig_weights,
                                               keep_original_weight=keep_original_weight)
            if _expected(era, return_orig_weights, keep_original_weight):
                assert list(result) == ["transformer.h.0.mlp.c_fc.weight"]
                assert torch.equal(result["transformer.h.0.mlp.c_fc.weight"],
                                   snapshot.as_weights_copy()["transformer.h.0.mlp.c_fc.weight"])
            else:
                assert result == {}, (era, return_orig_weights, keep_original_weight)


@pytest.fixture(scope="module")
def real_era():
    """The era of the EasyEdit installed here (PyPI wheel in CI), imported the documented way."""
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("easyeditor is not installed")
    easyedit.install_transformers_shim()
    easyedit.import_easyeditor(tolerate_missing_vision=True)
    return easyedit.detect_era()


def test_weights_copy_follows_the_installed_easyedit(real_era) -> None:
    assert real_era in ("A", "C")
    assert easyedit.detect_era(allow_import=False) == real_era
    _check_semantics(real_era)


@pytest.mark.parametrize("era", ["A", "C", None])
def test_weights_copy_semantics_of_every_era(real_era, era, monkeypatch) -> None:
    if era == real_era:
        pytest.skip("covered with the real EasyEdit by test_weights_copy_follows_the_installed_easyedit")
    monkeypatch.setattr(editing, "detect_era", lambda **kwargs: era)
    _check_semantics(era)


def test_maybe_copy_model() -> None:
    model = tiny_gpt2()
    assert maybe_copy_model(model, False) is model
    clone = maybe_copy_model(model, True)
    assert clone is not model
    assert_same(clone, state(model))
    perturb(clone, ["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(clone.state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           model.state_dict()["transformer.h.0.mlp.c_fc.weight"])
