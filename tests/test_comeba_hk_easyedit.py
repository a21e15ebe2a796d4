"""COMEBA-HK and MEMIT-C inside the installed EasyEdit: consecutive accumulation and exact restore, either era.

Era A (the 2023 wheel, CI): its editor cannot run on CPU, so the registered ``ALG_DICT`` entry is
called exactly as the wheel's ``batch_edit`` calls it, with requests from the wheel's own
``_prepare_requests``, and the wheel's restore rule (write ``weights_copy`` back) is applied.
Era C (GitHub HEAD on ``PYTHONPATH``, see tests/easyedit_env.md): ``BaseEditor.batch_edit`` end to end.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smedit_plugin import easyedit, easyedit_editor
from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model
from smedit_plugin.comeba_hk.state import find_state, state_parameters
from smedit_plugin.records import load_records
from smedit_plugin.requests import to_edit_kwargs
from smedit_plugin.registry import register

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(easyeditor, tmp_path_factory, tiny, zsre_eval_path):
    register()
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    stats = str(tmp_path_factory.mktemp("comeba_stats"))
    return tiny, records, stats


def _hp(alg: str, stats: str) -> COMEBAHKHyperParams:
    hp = COMEBAHKHyperParams.from_hparams(ROOT / "hparams" / alg / "smollm2-135m.yaml")
    return hp.replace(layers=[1, 2], v_loss_layer=3, v_num_grad_steps=3, batch_size=2, mom2_n_samples=40,
                      mom2_max_len=32, stats_dir=stats, context_template_length_params=[[4, 1]], device="cpu")


def _state(model, hp: COMEBAHKHyperParams) -> dict[str, torch.Tensor]:
    """Everything a step changes: the hook parameters, and for MEMIT-C the edited weights."""
    values = {n: p.detach().clone() for n, p in state_parameters(model).items()}
    if not hp.hooks_enabled:
        values.update({f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in hp.rewrite_module_names()})
    return values


def _expected_after_two_steps(model, tok, hp, requests) -> dict[str, torch.Tensor]:
    twin = __import__("copy").deepcopy(model)
    for chunk in (requests[:2], requests[2:]):
        apply_comeba_hk_to_model(twin, tok, chunk, hp)
    return _state(twin, hp)


@pytest.mark.parametrize("alg", ["COMEBA-HK", "MEMIT-C"])
def test_consecutive_steps_accumulate_and_restores_are_exact(setup, tmp_path, monkeypatch, alg: str) -> None:
    tiny, records, stats = setup
    model, tok = tiny("smollm2", n_layers=4)
    hp = _hp(alg, stats)
    kwargs = to_edit_kwargs(records)
    era = easyedit.detect_era()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    if era == "A":
        from easyeditor.editors.editor import BaseEditor
        from easyeditor.util.alg_dict import ALG_DICT

        requests = BaseEditor._prepare_requests(None, **kwargs)
        expected = _expected_after_two_steps(model, tok, hp, requests)
        apply = ALG_DICT[alg]
        for chunk in (requests[:2], requests[2:]):
            edited, weights_copy = apply(model, tok, chunk, hp, copy=False, return_orig_weights=True,
                                         keep_original_weight=False)
            assert edited is model and weights_copy == {}
        assert int(find_state(model).steps) == 2
        after = _state(model, hp)
        before_third = after
        edited, weights_copy = apply(model, tok, requests[:2], hp, copy=False, return_orig_weights=True,
                                     keep_original_weight=True)
        assert set(weights_copy) == set(before_third)
        with torch.no_grad():
            for name, value in weights_copy.items():
                model.get_parameter(name)[...] = value
        restored = _state(model, hp)
        assert all(torch.equal(restored[n], before_third[n]) for n in before_third)
    elif era == "C":
        monkeypatch.chdir(tmp_path)
        twin_model, _ = tiny("smollm2", n_layers=4)
        expected = _expected_after_two_steps(twin_model, tok, hp, _requests_like_easyedit(kwargs))
        editor = easyedit_editor.load_editor(hp, model=model, tokenizer=tok)
        metrics, edited, _ = editor.batch_edit(**kwargs, sequential_edit=True)
        assert edited is model and len(metrics) == 4
        assert int(find_state(model).steps) == 2
        after = _state(model, hp)
        editor.batch_edit(**kwargs, sequential_edit=False)
        restored = _state(model, hp)
        assert all(torch.equal(restored[n], after[n]) for n in after)
    else:
        pytest.skip(f"unknown EasyEdit era {era!r}")
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6)
    if alg == "COMEBA-HK":
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in originals.items())


def _requests_like_easyedit(kwargs: dict) -> list[dict]:
    return [{"prompt": p, "target_new": t, "subject": s}
            for p, t, s in zip(kwargs["prompts"], kwargs["target_new"], kwargs["subject"])]
