"""Real plugin methods inside the installed EasyEdit: accumulation and restore in either era.

Era A (the 2023 wheel, what CI has): its editor cannot run on CPU, so the registered ``ALG_DICT`` entry is
called exactly as the wheel's ``edit``/``batch_edit`` call it, with requests from the wheel's own
``_prepare_requests``, and the wheel's restore rule (write back ``weights_copy``) is applied.
Era C (GitHub HEAD on ``PYTHONPATH``): ``BaseEditor.batch_edit`` end to end through ``load_editor``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from smedit_plugin import easyedit, easyedit_editor
from smedit_plugin.hparams import load_method_hparams
from smedit_plugin.records import load_records
from smedit_plugin.requests import to_edit_kwargs
from smedit_plugin.hypernet.apply import editor_for
from smedit_plugin.hypernet.editor import apply_steps
from smedit_plugin.hypernet.training import train_hypernet
from smedit_plugin.registry import register

SMALL = dict(rank=8, n_blocks=2, micro_batch_size=2, batch_size=4)


@pytest.fixture(scope="module")
def setup(easyeditor, tmp_path_factory, tiny, zsre_train_path, zsre_eval_path):
    """A tiny SmolLM2-shaped model, an SMEdit archive trained on it, and 8 evaluation records."""
    register()
    model, tok = tiny("smollm2")
    train = load_records(Path(zsre_train_path), "zsre")[:8]
    records = load_records(Path(zsre_eval_path), "zsre")[:8]
    train_hp = load_method_hparams("SMEdit", "smollm2-135m", training=True).replace(n_edits=4, max_steps=1, **SMALL)
    archive = tmp_path_factory.mktemp("archive") / "smedit"
    train_hypernet(model, tok, train_hp, train, archive, progress=False)
    edit_hp = load_method_hparams("SMEdit", "smollm2-135m", training=False).replace(archive=str(archive), **SMALL)
    return model, tok, edit_hp, records


def _edit_weights(model, hp) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in hp.edit_modules}


def _set_edit_weights(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            model.get_submodule(name).weight.copy_(value)


def _expected_after(model, tok, hp, chunks) -> dict[str, torch.Tensor]:
    """Weights after applying ``chunks`` one after another on a copy, directly through the editor."""
    twin = copy.deepcopy(model)
    editor = editor_for(twin, hp)
    for chunk in chunks:
        apply_steps(twin, tok, editor, [r.prompt for r in chunk], [r.target_new for r in chunk])
    return _edit_weights(twin, hp)


def test_plugin_methods_accumulate_or_restore_as_the_installed_era_says(setup, tmp_path, monkeypatch) -> None:
    model, tok, hp, records = setup
    era = easyedit.detect_era()
    before = _edit_weights(model, hp)
    expected = _expected_after(model, tok, hp, [records[:4], records[4:]])
    assert any(not torch.equal(before[n], expected[n]) for n in before), "the trained editor must change weights"
    kwargs = to_edit_kwargs(records)
    if era == "A":
        from easyeditor.editors.editor import BaseEditor
        from easyeditor.util.alg_dict import ALG_DICT

        requests = BaseEditor._prepare_requests(None, **kwargs)
        apply = ALG_DICT["SMEdit"]
        for chunk in (requests[:4], requests[4:]):
            edited, weights_copy = apply(model, tok, chunk, hp, copy=False, return_orig_weights=True,
                                         keep_original_weight=False)
            assert edited is model and weights_copy == {}
        after = _edit_weights(model, hp)
        for name in before:
            torch.testing.assert_close(after[name], expected[name], rtol=0, atol=1e-6)
        _set_edit_weights(model, before)
        edited, weights_copy = apply(model, tok, requests[:4], hp, copy=False, return_orig_weights=True,
                                     keep_original_weight=True)
        assert set(weights_copy) == {f"{n}.weight" for n in hp.edit_modules}
        with torch.no_grad():
            for name, value in weights_copy.items():
                model.get_parameter(name)[...] = value
    elif era == "C":
        monkeypatch.chdir(tmp_path)
        editor = easyedit_editor.load_editor(hp, model=model, tokenizer=tok)
        metrics, edited, _ = editor.batch_edit(**kwargs, sequential_edit=True)
        assert edited is model and len(metrics) == 8
        after = _edit_weights(model, hp)
        for name in before:
            torch.testing.assert_close(after[name], expected[name], rtol=0, atol=1e-6)
        _set_edit_weights(model, before)
        editor.batch_edit(**kwargs, sequential_edit=False)
    else:
        pytest.skip(f"unknown EasyEdit era {era!r}")
    restored = _edit_weights(model, hp)
    assert all(torch.equal(restored[n], before[n]) for n in before)
