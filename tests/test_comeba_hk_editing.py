"""COMEBA-HK / MEMIT-C end to end on tiny random models: edits land, state persists, restores are exact."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smedit_plugin.comeba_hk import (COMEBAHKHyperParams, apply_comeba_hk_to_model, load_hook_state,
                                     remove_hook_layers, save_hook_state)
from smedit_plugin.comeba_hk import main as comeba_main
from smedit_plugin.comeba_hk.compute_ks import compute_keys_and_cur
from smedit_plugin.comeba_hk.state import find_state, state_parameters
from smedit_plugin.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
             mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
             ln_f_module="model.norm", lm_head_module="lm_head")
GPTJ = dict(rewrite_module_tmp="transformer.h.{}.mlp.fc_out", layer_module_tmp="transformer.h.{}",
            mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
            ln_f_module="transformer.ln_f", lm_head_module="lm_head")
REQUESTS = [
    {"prompt": "The name of the capital city of France is", "subject": "France", "target_new": "Rome",
     "ground_truth": "Paris"},
    {"prompt": "Which family does Ramalinaceae belong to?", "subject": "Ramalinaceae", "target_new": "Lamiinae"},
]
MORE = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "What university did Watts Humphrey attend?", "subject": "Watts Humphrey", "target_new": "Yale"},
]


pytestmark = pytest.mark.usefixtures("direct_call_semantics")


def _always_firing(hp: COMEBAHKHyperParams) -> COMEBAHKHyperParams:
    """``hp`` with ``alpha_z = -inf`` set past validation (the loader refuses it): every token gets the shift."""
    hp.alpha_z = -math.inf
    return hp


def _hp(stats_dir: str, **changes) -> COMEBAHKHyperParams:
    base = dict(model_name="tiny-llama", layers=[1, 2], v_loss_layer=3, v_num_grad_steps=6, clamp_norm_factor=4.0,
                mom2_update_weight=10.0, mom2_n_samples=60, mom2_max_len=32, stats_dir=stats_dir,
                context_template_length_params=[[4, 2]], **LLAMA)
    base.update(changes)
    return COMEBAHKHyperParams(**base)


def _model(arch: str = "llama3", dtype: torch.dtype = torch.float32):
    model, tok = tiny_model(arch, n_layers=4)
    return model.to(dtype), tok


def _target_logprob(model, tok, request: dict) -> float:
    prompt = tok(request["prompt"])["input_ids"]
    target = tok(" " + request["target_new"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + target])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))


def _logits(model, tok, text: str = "Paris is the capital of France and Rome of Italy") -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_edit_raises_target_and_leaves_every_original_parameter_bit_identical(stats_dir: str) -> None:
    model, tok = _model()
    before_params = _params(model)
    before_logits = _logits(model, tok)
    before = [_target_logprob(model, tok, r) for r in REQUESTS]
    hp = _always_firing(_hp(stats_dir))
    edited, weights_copy = apply_comeba_hk_to_model(model, tok, REQUESTS, hp, return_orig_weights=True)
    assert edited is model
    after = [_target_logprob(model, tok, r) for r in REQUESTS]
    assert all(a > b + 1e-3 for a, b in zip(after, before)), (before, after)
    for name, value in before_params.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert set(weights_copy) == set(state_parameters(model))
    assert not (_logits(model, tok) == before_logits).all()
    assert remove_hook_layers(model)
    assert torch.equal(_logits(model, tok), before_logits)
    assert set(dict(model.named_parameters())) == set(before_params)


def test_scope_test_off_equals_memit_c_first_step(stats_dir: str) -> None:
    hooked, tok = _model()
    plain, _ = _model()
    w0 = {n: plain.get_submodule(n).weight.detach().clone() for n in _hp(stats_dir).rewrite_module_names()}
    apply_comeba_hk_to_model(hooked, tok, REQUESTS, _always_firing(_hp(stats_dir, mask_bos=False)))
    apply_comeba_hk_to_model(plain, tok, REQUESTS, _hp(stats_dir, alg_name="MEMIT-C"))
    for name, weight0 in w0.items():
        memit_delta = plain.get_submodule(name).weight.detach() - weight0
        hook_delta = hooked.get_submodule(name).comeba_hook.delta_w.detach()
        assert memit_delta.abs().max() > 1e-4
        assert torch.allclose(hook_delta, memit_delta, rtol=1e-3, atol=1e-6), name
        assert torch.allclose(hooked.get_submodule(name).comeba_hook.c_accu, plain.get_submodule(name).comeba_hook.c_accu)


def test_c_accu_accumulates_every_steps_keys_exactly_and_alpha_only_decreases(stats_dir: str) -> None:
    model, tok = _model()
    hp = _hp(stats_dir, mom2_dtype="float64", v_num_grad_steps=2)
    keys_seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    original = comeba_main.compute_keys_and_cur

    def spy(model_, view, requests, groups, module, z_block, device):
        keys, cur = original(model_, view, requests, groups, module, z_block, device)
        keys_seen[0 if module is model.model.layers[1].mlp.down_proj else 1].append(keys.double())
        return keys, cur

    comeba_main.compute_keys_and_cur = spy
    alphas, initial = [], None
    try:
        for batch in (REQUESTS, MORE, REQUESTS[:1]):
            _, copy = apply_comeba_hk_to_model(model, tok, batch, hp, return_orig_weights=True)
            if initial is None:
                initial = {n: v for n, v in copy.items() if n.endswith("c_accu")}
            alphas.append([float(model.get_submodule(n).comeba_hook.alpha) for n in hp.rewrite_module_names()])
    finally:
        comeba_main.compute_keys_and_cur = original
    for i, name in enumerate(hp.rewrite_module_names()):
        expected = initial[f"{name}.comeba_hook.c_accu"].double() + sum(k @ k.T for k in keys_seen[i])
        assert len(keys_seen[i]) == 3
        assert torch.allclose(model.get_submodule(name).comeba_hook.c_accu, expected, rtol=0, atol=1e-9)
    flat = [[2.2, 2.2]] + alphas
    for prev, cur in zip(flat, flat[1:]):
        assert all(c <= p + 1e-7 for p, c in zip(prev, cur))
    assert int(find_state(model).steps) == 3


def _easyedit_restore(model, weights_copy: dict) -> None:
    """What EasyEdit HEAD's restore_after_edit does for a plugin name: write tensors back by parameter name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights_copy.items():
            params[name][...] = value.to(params[name])


@pytest.mark.parametrize("alg", ["COMEBA-HK", "MEMIT-C"])
def test_easyedit_restore_by_name_rolls_back_exactly(stats_dir: str, alg: str) -> None:
    model, tok = _model()
    fresh, _ = _model()
    base_logits = _logits(model, tok)
    base_params = _params(model)
    hp = _hp(stats_dir, alg_name=alg)
    _, copy = apply_comeba_hk_to_model(model, tok, REQUESTS, hp, return_orig_weights=True)
    assert not torch.equal(_logits(model, tok), base_logits)
    _easyedit_restore(model, copy)
    assert torch.equal(_logits(model, tok), base_logits)
    for name, value in base_params.items():
        assert torch.equal(dict(model.named_parameters())[name], value)
    apply_comeba_hk_to_model(model, tok, MORE, hp)
    apply_comeba_hk_to_model(fresh, tok, MORE, hp)
    assert torch.allclose(_logits(model, tok), _logits(fresh, tok), atol=1e-6)


def test_failure_mid_edit_puts_model_and_state_back(stats_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model()
    hp = _hp(stats_dir, alg_name="MEMIT-C")
    base = _params(model)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    original = comeba_main.compute_keys_and_cur
    monkeypatch.setattr(comeba_main, "compute_keys_and_cur", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    assert find_state(model) is None
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in base.items())
    monkeypatch.setattr(comeba_main, "compute_keys_and_cur", original)
    apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    edited = _params(model)
    calls.clear()
    monkeypatch.setattr(comeba_main, "compute_keys_and_cur", boom)
    with pytest.raises(RuntimeError):
        apply_comeba_hk_to_model(model, tok, MORE, hp)
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in edited.items())


def test_bad_input_fails_before_anything_changes(stats_dir: str) -> None:
    model, tok = _model()
    base = _params(model)
    side, pad = tok.padding_side, tok.pad_token
    cases = [
        ([{"prompt": "Who wrote Hamlet?", "target_new": "Marlowe"}], _hp(stats_dir), "subject"),
        ([{"prompt": "Who wrote Hamlet?", "target_new": "Marlowe", "subject": "Macbeth"}], _hp(stats_dir), "does not occur"),
        ([{"prompt": "Who wrote Hamlet?", "target_new": " ", "subject": "Hamlet"}], _hp(stats_dir), "target_new"),
        (REQUESTS, _hp(stats_dir, layers=[2, 7], v_loss_layer=8), "layers"),
        (REQUESTS, _hp(stats_dir, v_loss_layer=9), "v_loss_layer"),
        (REQUESTS, _hp(stats_dir, rewrite_module_tmp="model.layers.{}.mlp"), "rewrite_module_tmp"),
        (REQUESTS, _hp(stats_dir, lm_head_module="lm_hed"), "lm_head_module"),
    ]
    for requests, hp, needle in cases:
        with pytest.raises(ValueError, match=needle):
            apply_comeba_hk_to_model(model, tok, requests, hp)
        assert find_state(model) is None
    with pytest.raises(TypeError):
        apply_comeba_hk_to_model(model, tok, REQUESTS, object())
    assert set(dict(model.named_parameters())) == set(base)
    apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir))
    with pytest.raises(ValueError, match="already carries COMEBA-HK"):
        apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir, layers=[1]))
    with pytest.raises(ValueError, match="already carries COMEBA-HK"):
        apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir, alg_name="MEMIT-C"))
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_copy_edits_a_copy_and_hparams_stay_untouched(stats_dir: str) -> None:
    model, tok = _model()
    hp = _hp(stats_dir)
    snapshot = hp.to_dict()
    base = _logits(model, tok)
    edited, _ = apply_comeba_hk_to_model(model, tok, REQUESTS, hp, copy=True)
    assert edited is not model and find_state(model) is None
    assert torch.equal(_logits(model, tok), base)
    assert hp.to_dict() == snapshot
    assert remove_hook_layers(edited)
    assert torch.equal(_logits(edited, tok), base)


def _z_distance(model, tok, hp: COMEBAHKHyperParams, z: torch.Tensor) -> torch.Tensor:
    from smedit_plugin.comeba_hk.templates import TokenView, prepare_requests

    mods = comeba_main._Modules(model, hp)
    _, cur = compute_keys_and_cur(model, TokenView(tok), prepare_requests(REQUESTS), [["{}"]], mods.rewrite[0],
                                  mods.z_block, torch.device("cpu"))
    return (z - cur).norm(dim=0)


@pytest.mark.parametrize("arch,names", [("llama3", LLAMA), ("gpt-j", GPTJ), ("gemma-3", LLAMA)])
def test_step_moves_the_z_layer_output_to_the_target_values(stats_dir: str, monkeypatch: pytest.MonkeyPatch,
                                                            arch: str, names: dict) -> None:
    """MEMIT's premise: after the step the last edited block outputs ~z on the bare prompts.

    Gemma-3 norms the MLP output before the residual add; the residual is mapped through that norm.
    """
    model, tok = _model(arch)
    base = _logits(model, tok)
    hp = _always_firing(_hp(stats_dir, mom2_update_weight=1e-2, **names))
    captured = {}
    original = comeba_main.compute_target_values

    def spy(*args, **kwargs):
        captured["z"], info = original(*args, **kwargs)
        return captured["z"], info

    monkeypatch.setattr(comeba_main, "compute_target_values", spy)
    apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    end = _z_distance(model, tok, hp, captured["z"])
    remove_hook_layers(model)
    start = _z_distance(model, tok, hp, captured["z"])
    assert torch.equal(_logits(model, tok), base)
    assert (start > 1e-3).all()
    assert (end < 0.5 * start).all(), (start, end)


@pytest.mark.parametrize("arch,names", [("llama3", LLAMA), ("gpt-j", GPTJ), ("gemma-3", LLAMA)])
def test_suffix_only_z_steps_equal_full_prompt_steps(stats_dir: str, arch: str, names: dict) -> None:
    """The prefix cache, suffix buckets and replayed upper blocks are exact, only faster."""
    from smedit_plugin.comeba_hk.compute_z import compute_target_values
    from smedit_plugin.comeba_hk.templates import TokenView, prepare_requests

    model, tok = _model(arch)
    groups = [["{}"], ["Yesterday it rained. {}", "I think that {}"]]
    results = []
    for prefix in (True, False):
        hp = _hp(stats_dir, z_prefix_cache=prefix, v_num_grad_steps=4, **names)
        mods = comeba_main._Modules(model, hp)
        z, info = compute_target_values(model, TokenView(tok), prepare_requests(REQUESTS + MORE), groups, mods.z_block,
                                        mods.upper_blocks, mods.ln_f, mods.lm_head, mods.softcap, hp, torch.device("cpu"))
        results.append((z, info["z_loss"]))
    (z_prefix, loss_prefix), (z_full, loss_full) = results
    assert torch.allclose(z_prefix, z_full, atol=1e-4 * float(z_full.abs().max()))
    assert loss_prefix == pytest.approx(loss_full, rel=1e-4)


def test_target_values_in_chunks_equal_the_whole_batch_at_once(stats_dir: str) -> None:
    """Each request's delta has its own loss, Adam state, early stop and clamp: chunking is exact."""
    from smedit_plugin.comeba_hk.compute_z import compute_target_values
    from smedit_plugin.comeba_hk.templates import TokenView, prepare_requests

    model, tok = _model("llama3")
    groups = [["{}"], ["Yesterday it rained. {}", "I think that {}"]]
    requests = prepare_requests(REQUESTS + MORE)
    assert len(requests) >= 3
    results = {}
    for chunk in (0, 1, 2):
        hp = _hp(stats_dir, z_chunk_size=chunk, v_num_grad_steps=4, **LLAMA)
        mods = comeba_main._Modules(model, hp)
        results[chunk] = compute_target_values(model, TokenView(tok), requests, groups, mods.z_block,
                                               mods.upper_blocks, mods.ln_f, mods.lm_head, mods.softcap, hp,
                                               torch.device("cpu"))
    z_all, info_all = results[0]
    assert z_all.shape[1] == len(requests)
    for chunk in (1, 2):
        z, info = results[chunk]
        assert torch.allclose(z, z_all, atol=1e-4 * float(z_all.abs().max())), chunk
        assert info["z_loss"] == pytest.approx(info_all["z_loss"], rel=1e-4)
        assert info["z_steps"] == info_all["z_steps"]
    assert max(info_all["z_steps"]) > 0  # the optimisation ran, so equality is not trivial


def test_bfloat16_model_edits_with_float32_state(stats_dir: str) -> None:
    model, tok = _model(dtype=torch.bfloat16)
    base = _logits(model, tok)
    before = _target_logprob(model, tok, REQUESTS[0])
    apply_comeba_hk_to_model(model, tok, REQUESTS, _always_firing(_hp(stats_dir)))
    layer = model.model.layers[1].mlp.down_proj.comeba_hook
    assert layer.delta_w.dtype == torch.float32 and layer.c_accu.dtype == torch.float32
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert _target_logprob(model, tok, REQUESTS[0]) > before
    remove_hook_layers(model)
    assert torch.equal(_logits(model, tok), base)


_CONTINUE = """
import json, sys, torch
from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model, load_hook_state
from smedit_plugin.testing import tiny_model
cfg = json.loads(sys.argv[1])
model, tok = tiny_model("llama3", n_layers=4)
load_hook_state(model, cfg["state"])
apply_comeba_hk_to_model(model, tok, cfg["requests"], COMEBAHKHyperParams(**cfg["hp"]))
with torch.no_grad():
    logits = model(**tok(cfg["text"], return_tensors="pt")).logits
torch.save(logits, cfg["out"])
"""


@pytest.mark.parametrize("alg", ["COMEBA-HK", "MEMIT-C"])
def test_save_load_in_a_fresh_process_then_continue_equals_one_process(stats_dir: str, tmp_path: Path, alg: str) -> None:
    model, tok = _model()
    hp = _hp(stats_dir, alg_name=alg)
    apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    save_hook_state(model, tmp_path / "state")
    after_first = _logits(model, tok)
    apply_comeba_hk_to_model(model, tok, MORE, hp)
    text = "Paris is the capital of France and Rome of Italy"
    expected = _logits(model, tok, text)
    reloaded, _ = _model()
    load_hook_state(reloaded, tmp_path / "state")
    assert torch.equal(_logits(reloaded, tok), after_first)
    config = {"state": str(tmp_path / "state"), "requests": MORE, "text": text, "out": str(tmp_path / "logits.pt"),
              "hp": {k: v for k, v in hp.to_dict().items()}}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), SMEDIT_NO_EASYEDIT="1")
    subprocess.run([sys.executable, "-c", _CONTINUE, json.dumps(config)], check=True, env=env, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_loading_into_another_model_is_refused(stats_dir: str, tmp_path: Path) -> None:
    model, tok = _model()
    apply_comeba_hk_to_model(model, tok, REQUESTS, _hp(stats_dir))
    save_hook_state(model, tmp_path)
    other, _ = tiny_model("llama3", n_layers=4, seed=1)
    with pytest.raises(ValueError, match="different base model"):
        load_hook_state(other, tmp_path)
    with pytest.raises(ValueError, match="already carries"):
        load_hook_state(model, tmp_path)
