"""The plugin inside EasyEdit's current GitHub source (era C) on CPU: register, load_editor, edit, batch_edit.

Needs EasyEdit HEAD on ``PYTHONPATH`` (see tests/easyedit_env.md); skipped otherwise. A PROBE apply
function (adds a constant to one MLP weight, through ``edit_transaction`` and
``weights_copy_for_easyedit`` like every plugin method) is registered under a test-only name and
driven through ``BaseEditor.edit``/``batch_edit`` with ``sequential_edit`` True and False.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from typing import Any, Optional

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smedit_plugin import easyedit, easyedit_editor
from smedit_plugin.editing import edit_transaction, maybe_copy_model, weights_copy_for_easyedit
from smedit_plugin.hparams import MethodHyperParams
from smedit_plugin.methods import LOCATE_FAMILY, METHODS, MethodSpec
from smedit_plugin.registry import register

pytestmark = pytest.mark.easyedit_head


def _head_or_skip() -> Any:
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("EasyEdit is not importable; put its GitHub source on PYTHONPATH (tests/easyedit_env.md)",
                    allow_module_level=True)
    easyedit.install_transformers_shim()
    module = easyedit.import_easyeditor(tolerate_missing_vision=True)
    if easyedit.detect_era() != "C":
        pytest.skip("the installed EasyEdit is not GitHub HEAD (era C)", allow_module_level=True)
    return module


EASYEDITOR = _head_or_skip()

PROBE = "SMEditHeadProbe"
PROBE_WEIGHT = "model.layers.0.mlp.down_proj.weight"
DELTA = 0.25
CALLS: list[dict[str, Any]] = []
FAIL_AFTER_CHANGE: dict[str, bool] = {"on": False}


def probe_apply(model: torch.nn.Module, tok: Any, requests: list[dict], hparams: Any, copy: bool = False,
                return_orig_weights: bool = False, keep_original_weight: bool = False,
                **kwargs: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Adds ``DELTA`` per request to one MLP weight, the way plugin apply functions edit."""
    edited = maybe_copy_model(model, copy)
    weight = dict(edited.named_parameters())[PROBE_WEIGHT]
    CALLS.append({"model": edited, "n_requests": len(requests), "weight_at_entry": weight.detach().clone(),
                  "return_orig_weights": return_orig_weights, "keep_original_weight": keep_original_weight,
                  "kwargs": sorted(kwargs)})
    with edit_transaction(edited) as snapshot:
        snapshot.capture(PROBE_WEIGHT)
        with torch.no_grad():
            weight.add_(DELTA * len(requests))
        if FAIL_AFTER_CHANGE["on"]:
            raise FloatingPointError("edit diverged halfway")
    return edited, weights_copy_for_easyedit(snapshot, return_orig_weights=return_orig_weights,
                                             keep_original_weight=keep_original_weight)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from smedit_plugin.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def tiny_llama(tokenizer: Any) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture()
def registered(monkeypatch, tmp_path):
    """Plugin methods plus the probe registered; EasyEdit's tables restored afterwards; logs go to tmp_path."""
    monkeypatch.chdir(tmp_path)  # EasyEdit writes ./logs/run.log and ./logs/results.json
    table = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch_editor = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    saved_table, saved_method = dict(table), batch_editor.__dict__["is_batchable_method"]
    monkeypatch.setitem(METHODS, PROBE, MethodSpec(PROBE, "smedit_plugin.hparams:MethodHyperParams",
                                                   f"{__name__}:probe_apply", LOCATE_FAMILY, batchable=True,
                                                   summary="test probe"))
    report = register()
    CALLS.clear()
    yield report
    table.clear()
    table.update(saved_table)
    setattr(batch_editor, "is_batchable_method", saved_method)


@pytest.fixture()
def requests(zsre_eval_path) -> dict[str, Any]:
    records = json.loads(zsre_eval_path.read_text(encoding="utf-8"))[:4]
    return {
        "prompts": [r["src"] for r in records],
        "target_new": [r["alt"] for r in records],
        "ground_truth": [r["answers"][0] for r in records],
        "rephrase_prompts": [r["rephrase"] for r in records],
        "locality_inputs": {"neighborhood": {"prompt": [r["loc"] for r in records],
                                             "ground_truth": [r["loc_ans"] for r in records]}},
    }


def probe_hparams(batch_size: int = 1) -> MethodHyperParams:
    return MethodHyperParams(alg_name=PROBE, model_name="tiny-llama", device="cpu", batch_size=batch_size,
                             max_length=48)


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def shifted(weight: torch.Tensor, *shifts: float) -> torch.Tensor:
    """``weight`` after the probe's in-place additions, in the same order (float sums are not associative)."""
    out = weight.clone()
    for shift in shifts:
        out.add_(shift)
    return out


def assert_weights(model: torch.nn.Module, before: dict[str, torch.Tensor], *probe_shifts: float) -> None:
    """Every tensor bit-exactly as before, except the probe weight, shifted by ``probe_shifts`` in turn."""
    now = model.state_dict()
    for name, value in before.items():
        expected = shifted(value, *probe_shifts) if name == PROBE_WEIGHT else value
        assert torch.equal(now[name], expected), f"{name}: expected shifts {probe_shifts}"
    assert torch.equal(now[PROBE_WEIGHT], before[PROBE_WEIGHT]) == (not probe_shifts)


def assert_metrics(metrics: list[dict], n: int) -> None:
    assert len(metrics) == n
    for record in metrics:
        for phase in ("pre", "post"):
            assert isinstance(record[phase]["rewrite_acc"], list)
            assert isinstance(record[phase]["rephrase_acc"], list)
        accs = record["post"]["locality"]["neighborhood_acc"]
        assert all(0.0 <= a <= 1.0 for a in accs)


def test_register_reports_era_c(registered) -> None:
    assert registered.era == "C"
    assert registered.capabilities == {"sequential_edit": True, "normalize_device": True,
                                       "restore_after_edit": True, "hparams_to_dict": True}
    assert PROBE in registered.added  # earlier tests in this process may have registered the rest already
    assert set(METHODS) <= set(registered.added) | set(registered.already_registered)


def test_load_editor_uses_a_copy_and_a_string_model_name(registered, tokenizer) -> None:
    model = tiny_llama(tokenizer)
    hparams = probe_hparams()
    editor = easyedit_editor.load_editor(hparams, model=model, tokenizer=tokenizer, name="/runs/tiny-llama")
    assert editor.model is model and editor.tok is tokenizer
    assert editor.model_name == "llama:tiny-llama"
    assert hparams.model_name == "tiny-llama" and editor.hparams is not hparams
    assert editor.hparams.model_name == "llama:tiny-llama", "EasyEdit calls .lower() on it"
    assert editor.apply_algo is importlib.import_module("easyeditor.util.alg_dict").ALG_DICT[PROBE]


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_restores_or_accumulates(registered, tokenizer, requests, sequential) -> None:
    model = tiny_llama(tokenizer)
    before = snapshot_state(model)
    editor = easyedit_editor.load_editor(probe_hparams(), model=model, tokenizer=tokenizer)
    metrics, edited, weights_copy = editor.edit(**requests, sequential_edit=sequential, verbose=False)
    assert_metrics(metrics, 4)
    assert [m["case_id"] for m in metrics] == [0, 1, 2, 3]
    assert edited is model is editor.model
    assert [c["n_requests"] for c in CALLS] == [1, 1, 1, 1]
    assert all(c["model"] is model and c["return_orig_weights"] and not c["keep_original_weight"] for c in CALLS)
    for i, call in enumerate(CALLS):
        earlier = [DELTA] * i if sequential else []
        assert torch.equal(call["weight_at_entry"], shifted(before[PROBE_WEIGHT], *earlier))
    assert list(weights_copy) == [PROBE_WEIGHT]
    assert_weights(model, before, *([DELTA] * 4 if sequential else []))


@pytest.mark.parametrize("sequential", [False, True])
def test_batch_edit_restores_or_accumulates(registered, tokenizer, requests, sequential) -> None:
    model = tiny_llama(tokenizer)
    before = snapshot_state(model)
    editor = easyedit_editor.load_editor(probe_hparams(batch_size=2), model=model, tokenizer=tokenizer)
    metrics, edited, _ = editor.batch_edit(**requests, sequential_edit=sequential, verbose=False)
    assert_metrics(metrics, 4)
    assert [m["case_id"] for m in metrics] == [0, 1, 0, 1]
    assert all("time" in m for m in metrics)
    assert edited is model is editor.model
    assert [c["n_requests"] for c in CALLS] == [2, 2]
    assert torch.equal(CALLS[1]["weight_at_entry"], shifted(before[PROBE_WEIGHT], *([2 * DELTA] if sequential else [])))
    assert_weights(model, before, *([2 * DELTA] * 2 if sequential else []))


def test_edit_refuses_batch_size_above_one_for_any_method(registered, tokenizer, requests) -> None:
    """HEAD's edit() asserts batch_size == 1 even for batchable methods (contract §1.2)."""
    model = tiny_llama(tokenizer)
    before = snapshot_state(model)
    editor = easyedit_editor.load_editor(probe_hparams(batch_size=2), model=model, tokenizer=tokenizer)
    with pytest.raises(AssertionError, match="batch_size"):
        editor.edit(**requests, verbose=False)
    assert CALLS == []
    assert_weights(model, before)


def test_failed_edit_leaves_the_model_untouched(registered, tokenizer, requests, monkeypatch) -> None:
    model = tiny_llama(tokenizer)
    before = snapshot_state(model)
    editor = easyedit_editor.load_editor(probe_hparams(), model=model, tokenizer=tokenizer)
    monkeypatch.setitem(FAIL_AFTER_CHANGE, "on", True)
    with pytest.raises(FloatingPointError, match="halfway"):
        editor.edit(**requests, sequential_edit=True, verbose=False)
    assert len(CALLS) == 1
    assert_weights(model, before)


@dataclasses.dataclass
class _PlainHyperParams(importlib.import_module("easyeditor.util.hparams").HyperParams):
    """An EasyEdit-style hparams dataclass without ``replace`` (load_editor falls back to dataclasses.replace)."""

    alg_name: str
    model_name: Any
    device: Optional[str] = "cpu"
    model_parallel: bool = False
    batch_size: int = 1
    max_length: int = 48


def test_load_editor_by_name_from_a_saved_model(registered, tokenizer, requests, tmp_path) -> None:
    model = tiny_llama(tokenizer)
    directory = tmp_path / "saved-tiny-llama"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    hparams = _PlainHyperParams(alg_name=PROBE, model_name=str(directory))
    editor = easyedit_editor.load_editor(hparams)
    assert hparams.model_name == str(directory)
    assert editor.model_name == "llama:saved-tiny-llama"
    assert editor.tok.pad_token is not None
    before = snapshot_state(editor.model)
    assert torch.equal(before[PROBE_WEIGHT], model.state_dict()[PROBE_WEIGHT])
    metrics, _, _ = editor.edit(**requests, sequential_edit=False, verbose=False)
    assert_metrics(metrics, 4)
    assert_weights(editor.model, before)
