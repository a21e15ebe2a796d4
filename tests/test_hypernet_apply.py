"""EasyEdit apply functions of the hypernetwork methods (contract §1.3) on a tiny model with saved archives."""
from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
from torch import nn

from smedit_plugin import editing
from smedit_plugin.records import EditRecord, load_records
from smedit_plugin.hypernet import apply as apply_module
from smedit_plugin.hypernet import editor as editor_module
from smedit_plugin.hypernet.archive import save_archive
from smedit_plugin.hypernet.cache import cache_keys_and_value_grads
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.hypernet.hparams import HypernetHyperParams
from smedit_plugin.hypernet.network import shape_key
from smedit_plugin.hypernet.shifts import add_param_shift_, predict_param_shift
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.malmen2.main import apply_malmen2_to_model
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.rledit2.main import apply_rledit2_to_model
from smedit_plugin.smedit.hparams import SMEditHyperParams
from smedit_plugin.smedit.main import apply_smedit_to_model
from smedit_plugin.text import build_batch

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
WEIGHTS = [f"{m}.weight" for m in MODULES]
SMALL = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3,
             micro_batch_size=2, chunk_size=3)


@pytest.fixture(scope="module")
def tiny4(tiny):
    """One random 4-layer SmolLM2-shaped model per module; tests edit deep copies of it."""
    return tiny("smollm2", n_layers=4)


def make_archive(model: nn.Module, tok, hp: HypernetHyperParams, path: Path, records: list[EditRecord],
                 seed: int) -> HypernetHyperParams:
    """Save an editor as training would leave it: statistics of real cached rows, weights moved off their init (by no
    more than one Adam step at ``meta_lr`` 1e-3 can move them, which the archive checks on load)."""
    editor = HypernetEditor(model, hp)
    pairs = [(n, model.get_submodule(n)) for n in MODULES]
    batch = build_batch(tok, [r.prompt for r in records], [r.target_new for r in records])
    caches = cache_keys_and_value_grads(model, pairs, [batch])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        for step in range(len(editor.nets)):
            for pos, name in enumerate(MODULES):
                editor.net_for(step, pos).update_normaliser(caches[name].keys, caches[name].value_grads)
    save_archive(path, editor, model_name="tiny-smollm2")
    return hp.replace(archive=str(path))


@pytest.fixture(scope="module")
def train_records(zsre_train_path) -> list[EditRecord]:
    return load_records(zsre_train_path, dataset="zsre", limit=4)


@pytest.fixture(scope="module")
def malmen2(tiny4, tmp_path_factory, train_records) -> MALMEN2HyperParams:
    return make_archive(*tiny4, MALMEN2HyperParams(**SMALL), tmp_path_factory.mktemp("malmen2") / "archive",
                        train_records, seed=0)


@pytest.fixture(scope="module")
def requests(zsre_eval_path) -> list[dict]:
    """Request dicts with the keys, in the order, EasyEdit's ``_prepare_requests`` builds them."""
    records = load_records(zsre_eval_path, dataset="zsre", limit=2)
    out = []
    for r in records:
        req = {"prompt": r.prompt, "target_new": r.target_new, "ground_truth": r.ground_truth, "portability": {},
               "locality": {}}
        req["subject"] = r.subject
        req["rephrase_prompt"] = r.rephrase_prompts[0]
        req["locality"]["neighborhood"] = {"prompt": r.locality_prompts[0], "ground_truth": r.locality_answers[0]}
        out.append(req)
    return out


@pytest.fixture(autouse=True)
def era_c(monkeypatch):
    """Current EasyEdit semantics unless a test says otherwise (another test may have imported the PyPI wheel)."""
    monkeypatch.setattr(editing, "detect_era", lambda **kwargs: "C")


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_edits_in_place_and_weights_copy_restores_bit_exactly(tiny4, malmen2, requests) -> None:
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1" in name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = weights_of(model)
    editor = apply_module.editor_for(model, malmen2)
    stats = {k: v.clone() for k, v in editor.nets.state_dict().items()}

    out, weights_copy = apply_malmen2_to_model(model, tok, requests, malmen2, copy=False, return_orig_weights=True,
                                               keep_original_weight=False, train_ds=None)

    assert out is model and apply_module.editor_for(model, malmen2) is editor
    assert changed(model, before) == set(WEIGHTS)
    params = dict(model.named_parameters())
    assert list(weights_copy) == WEIGHTS
    for name, saved in weights_copy.items():
        assert torch.equal(saved, before[name]) and saved.data_ptr() != params[name].data_ptr()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, stats[k]) for k, v in editor.nets.state_dict().items())  # normaliser frozen
    assert not any(net.normaliser.frozen for nets in editor.nets for net in nets.values())
    with torch.no_grad():  # EasyEdit's restore: copy each tensor into the parameter of that exact name
        for name, saved in weights_copy.items():
            params[name][...] = saved.to(params[name].device, params[name].dtype)
    assert not changed(model, before)


def test_weights_copy_follows_the_easyedit_era(tiny4, malmen2, requests, monkeypatch) -> None:
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    _, none_asked = apply_malmen2_to_model(model, tok, requests[:1], malmen2, return_orig_weights=False)
    monkeypatch.setattr(editing, "detect_era", lambda **kwargs: "A")
    _, accumulate = apply_malmen2_to_model(model, tok, requests[:1], malmen2, return_orig_weights=True)
    before = weights_of(model)
    _, restore = apply_malmen2_to_model(model, tok, requests[:1], malmen2, return_orig_weights=True,
                                        keep_original_weight=True)
    assert none_asked == {} and accumulate == {}
    assert list(restore) == WEIGHTS and all(torch.equal(restore[n], before[n]) for n in WEIGHTS)


def test_a_failure_mid_edit_restores_the_weights(tiny4, malmen2, requests, monkeypatch) -> None:
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    before = weights_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    real = editor_module.predict_param_shift
    calls: list[int] = []
    first_module_edited: list[bool] = []

    def fails_in_the_second_step(*args, **kwargs):  # a step writes its shifts after all modules are predicted
        calls.append(1)
        if len(calls) == len(MODULES) + 2:
            first_module_edited.append(not torch.equal(model.get_parameter(WEIGHTS[0]), before[WEIGHTS[0]]))
            raise RuntimeError("simulated failure in the second module")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_module, "predict_param_shift", fails_in_the_second_step)
    with pytest.raises(RuntimeError, match="simulated failure"):
        apply_malmen2_to_model(model, tok, requests, malmen2, return_orig_weights=True)
    assert first_module_edited == [True]  # the failure really came after a weight had changed
    assert not changed(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    editor = apply_module.editor_for(model, malmen2)
    assert not any(net.normaliser.frozen for nets in editor.nets for net in nets.values())


class DropsAnswer:
    """The real tokenizer, except that one answer text tokenises to nothing."""

    def __init__(self, tok, dropped: str) -> None:
        self._tok = tok
        self._dropped = dropped

    def __call__(self, text, **kwargs):
        if text.strip() == self._dropped:
            return {"input_ids": [], "attention_mask": []}
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("bad,error,needle", [
    ([], ValueError, "non-empty list"),
    ("The capital of France is", ValueError, "non-empty list"),
    (["The capital of France is"], ValueError, "request 0 must be a dict"),
    ([{"prompt": "The capital of France is", "target_new": ""}], ValueError, "'target_new' must be a non-empty string"),
    ([{"prompt": "The capital of France is", "target_new": "  "}], ValueError, "'target_new'"),
    ([{"prompt": "Q", "target_new": "A"}, {"prompt": "Q", "target_new": ["Rome"]}], ValueError,
     "request 1: field 'target_new'"),
    ([{"prompt": None, "target_new": "Rome"}], ValueError, "request 0: field 'prompt'"),
    ([{"target_new": "Rome"}], ValueError, "field 'prompt'"),
    ([{"prompt": "The capital of France is", "target_new": "Rome"},
      {"prompt": "The CEO of Apple is", "target_new": "VANISH"}], ValueError, "answers\\[1\\].*zero tokens"),
], ids=["empty", "str", "not-a-dict", "empty-target", "blank-target", "list-target", "none-prompt", "no-prompt",
        "zero-tokens"])
def test_bad_requests_raise_before_any_weight_changes(tiny4, malmen2, monkeypatch, bad, error, needle) -> None:
    model, tok = copy.deepcopy(tiny4[0]), DropsAnswer(tiny4[1], "VANISH")
    before = weights_of(model)
    added: list[int] = []
    monkeypatch.setattr(editor_module, "add_param_shift_", lambda *a, **k: added.append(1))
    with pytest.raises(error, match=needle):
        apply_malmen2_to_model(model, tok, bad, malmen2, return_orig_weights=True)
    assert added == [] and not changed(model, before)


def test_wrong_hparams_class_is_a_type_error(tiny4, malmen2, requests) -> None:
    model = copy.deepcopy(tiny4[0])
    with pytest.raises(TypeError, match="apply_smedit_to_model needs SMEditHyperParams, got MALMEN2HyperParams"):
        apply_smedit_to_model(model, tiny4[1], requests, malmen2)


def test_copy_true_leaves_the_original_untouched(tiny4, malmen2, requests) -> None:
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    before = weights_of(model)
    out, weights_copy = apply_malmen2_to_model(model, tok, requests, malmen2, copy=True, return_orig_weights=True)
    assert out is not model and not changed(model, before)
    assert changed(out, before) == set(WEIGHTS)
    out_params = dict(out.named_parameters())
    assert all(torch.equal(weights_copy[n], before[n]) and weights_copy[n].data_ptr() != out_params[n].data_ptr()
               for n in WEIGHTS)


def test_bf16_model_with_fp32_hypernet(tiny4, malmen2, requests) -> None:
    tok = tiny4[1]
    fp32, bf16 = copy.deepcopy(tiny4[0]), copy.deepcopy(tiny4[0]).to(torch.bfloat16)
    before32, before16 = weights_of(fp32), weights_of(bf16)
    apply_malmen2_to_model(fp32, tok, requests, malmen2)
    _, weights_copy = apply_malmen2_to_model(bf16, tok, requests, malmen2, return_orig_weights=True)
    editor = apply_module.editor_for(bf16, malmen2)
    assert all(p.dtype == torch.float32 for p in editor.nets.parameters())
    assert changed(bf16, before16) == set(WEIGHTS)
    for name in WEIGHTS:
        weight = bf16.get_parameter(name)
        assert weight.dtype == torch.bfloat16 and torch.isfinite(weight).all()
        assert weights_copy[name].dtype == torch.bfloat16 and torch.equal(weights_copy[name], before16[name])
        shift16 = (weight.detach().float() - before16[name].float()).flatten()
        shift32 = (fp32.get_parameter(name).detach() - before32[name]).flatten()
        assert torch.nn.functional.cosine_similarity(shift16, shift32, dim=0) > 0.99


def test_editors_are_cached_per_model_and_hparams(tiny4, malmen2, requests, monkeypatch) -> None:
    tok = tiny4[1]
    loads: list[int] = []
    real = apply_module.load_archive
    monkeypatch.setattr(apply_module, "load_archive", lambda *a, **k: (loads.append(1), real(*a, **k))[1])
    model = copy.deepcopy(tiny4[0])
    apply_malmen2_to_model(model, tok, requests[:1], malmen2)
    apply_malmen2_to_model(model, tok, requests[:1], malmen2)
    assert len(loads) == 1
    one_per_mb = malmen2.replace(micro_batch_size=1)
    assert apply_module.editor_for(model, one_per_mb).hparams.micro_batch_size == 1
    assert len(loads) == 2
    other = copy.deepcopy(tiny4[0])
    apply_malmen2_to_model(other, tok, requests[:1], malmen2)
    assert len(loads) == 3 and apply_module.editor_for(other, malmen2) is not apply_module.editor_for(model, one_per_mb)
    gc.collect()  # models of earlier tests that are already unreachable must not be counted below
    cached = len(apply_module._EDITORS)
    del other
    gc.collect()
    assert len(apply_module._EDITORS) == cached - 1  # an editor never keeps its model alive


@pytest.mark.parametrize("method", ["SMEdit", "RLEdit2"])
def test_step_specific_networks_apply_stacked_steps(tiny4, requests, train_records, tmp_path, method) -> None:
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    if method == "SMEdit":
        hp, apply = SMEditHyperParams(**SMALL, num_seq=2), apply_smedit_to_model
    else:
        hp, apply = RLEdit2HyperParams(**SMALL, num_seq=2), apply_rledit2_to_model
    hp = make_archive(model, tok, hp, tmp_path / "archive", train_records, seed=1)
    reference = copy.deepcopy(model)
    out, _ = apply(model, tok, requests, hp)

    editor = apply_module.editor_for(reference, hp)
    assert len(editor.nets) == 2 and editor.describe()["ranks"] == [4, 2]
    pairs = [(n, reference.get_submodule(n)) for n in MODULES]
    prompts, targets = [r["prompt"] for r in requests], [r["target_new"] for r in requests]
    for step in range(2):  # cache at the current weights, network ``step``, add; no normaliser update
        caches = cache_keys_and_value_grads(reference, pairs, [build_batch(tok, prompts, targets)])
        for pos, (name, module) in enumerate(pairs):
            net = editor.nets[step][shape_key(editor.shapes[pos])]
            shift, _ = predict_param_shift(net, editor.module_idx[pos], caches[name], chunk_size=hp.chunk_size)
            add_param_shift_(module, shift)
    for name in WEIGHTS:
        assert torch.equal(out.get_parameter(name), reference.get_parameter(name)), name
