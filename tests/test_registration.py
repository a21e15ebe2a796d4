"""``register()`` against the installed EasyEdit (the PyPI wheel in CI; GitHub HEAD works too).

EasyEdit is imported the documented way: ``install_transformers_shim()`` then
``import_easyeditor(tolerate_missing_vision=True)``. Every test leaves ``ALG_DICT`` and
``BatchEditor.is_batchable_method`` as it found them.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smedit_plugin import easyedit, easyedit_editor
from smedit_plugin.hparams import HyperParamsError
from smedit_plugin.methods import LOCATE_FAMILY, METHODS, MethodSpec
from smedit_plugin.registry import make_easyedit_apply, register

ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("easyeditor") is None:
    pytest.skip("easyeditor is not installed (see tests/easyedit_env.md)", allow_module_level=True)

IMPORT_EASYEDIT = ("from smedit_plugin.easyedit import install_transformers_shim, import_easyeditor\n"
                   "install_transformers_shim()\n"
                   "import_easyeditor(tolerate_missing_vision=True)\n")


@pytest.fixture(scope="module")
def ee():
    easyedit.install_transformers_shim()
    return easyedit.import_easyeditor(tolerate_missing_vision=True)


@pytest.fixture()
def alg_dict(ee):
    """The real ``ALG_DICT``, restored in place after the test (with ``is_batchable_method``)."""
    table = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch_editor = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    saved_table = dict(table)
    saved_method = batch_editor.__dict__["is_batchable_method"]
    # start from EasyEdit as shipped, even if an earlier test module registered the plugin
    for name in [n for n, value in table.items() if getattr(value, "_smedit_method", None)]:
        del table[name]
    func = saved_method.__func__
    if getattr(func, "_smedit_wrapped", False):
        setattr(batch_editor, "is_batchable_method", staticmethod(func._smedit_original))
    yield table
    table.clear()
    table.update(saved_table)
    setattr(batch_editor, "is_batchable_method", saved_method)


@pytest.fixture()
def batch_editor(alg_dict):
    return importlib.import_module("easyeditor.editors.batch_editor").BatchEditor


def run_python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter (from ``tmp_path``) and parse the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_register_adds_every_method_in_place(alg_dict, ee) -> None:
    editor_module = importlib.import_module("easyeditor.editors.editor")
    assert editor_module.ALG_DICT is alg_dict  # the editor reads this very dict
    report = register()
    for name in METHODS:
        assert callable(alg_dict[name]) and alg_dict[name]._smedit_method == name
        assert name in report.added
    assert report.already_registered == () and report.replaced == () and report.changed
    sequential = "sequential_edit" in inspect.signature(editor_module.BaseEditor.edit).parameters
    assert report.era == ("C" if sequential else "A") == easyedit.detect_era()
    assert report.capabilities["sequential_edit"] is sequential
    assert set(report.capabilities) == {"sequential_edit", "normalize_device", "restore_after_edit", "hparams_to_dict"}


def test_batch_capable_methods_become_batchable(batch_editor) -> None:
    original = batch_editor.__dict__["is_batchable_method"].__func__
    builtin = [member.value for member in batch_editor] + ["ROME", "KN", "IKE", "LoRA", "GRACE", "no-such-method"]
    expected = {name: original(name) for name in builtin}
    assert not any(original(name) for name in METHODS)
    report = register()
    batch_capable = [name for name, spec in METHODS.items() if spec.batchable]
    assert batch_capable and set(report.batchable) == set(batch_capable) == set(report.newly_batchable)
    for name in batch_capable:
        assert batch_editor.is_batchable_method(name) is True
    for name, before in expected.items():
        assert batch_editor.is_batchable_method(name) == before, name
    assert importlib.import_module("easyeditor.editors.editor").BatchEditor is batch_editor


def test_second_call_changes_nothing(alg_dict, batch_editor) -> None:
    register()
    entries = dict(alg_dict)
    wrapper = batch_editor.__dict__["is_batchable_method"].__func__
    report = register()
    assert report.added == () and report.replaced == () and report.newly_batchable == ()
    assert set(report.already_registered) == set(METHODS) and not report.changed
    assert dict(alg_dict) == entries and all(alg_dict[k] is v for k, v in entries.items())
    assert batch_editor.__dict__["is_batchable_method"].__func__ is wrapper


def test_batchable_wrapper_is_installed_once(batch_editor) -> None:
    original = batch_editor.__dict__["is_batchable_method"].__func__
    first = register(batchable=False)
    assert first.batchable == () and not batch_editor.is_batchable_method("SMEdit")
    second = register(["SMEdit"])
    assert second.added == () and second.newly_batchable == ("SMEdit",) and second.changed
    wrapper = batch_editor.__dict__["is_batchable_method"].__func__
    register()
    assert batch_editor.__dict__["is_batchable_method"].__func__ is wrapper
    assert wrapper._smedit_wrapped and wrapper._smedit_original is original
    assert batch_editor.is_batchable_method("SMEdit") and batch_editor.is_batchable_method("RLEdit2")


def test_collision_is_refused_before_anything_changes(alg_dict, batch_editor) -> None:
    def someone_elses_smedit(*args, **kwargs):
        raise AssertionError("must not be called")

    alg_dict["SMEdit"] = someone_elses_smedit
    before = dict(alg_dict)
    method_before = batch_editor.__dict__["is_batchable_method"]
    with pytest.raises(ValueError, match=r"'SMEdit'.*override=True"):
        register()
    assert dict(alg_dict) == before and "MALMEN2" not in alg_dict
    assert batch_editor.__dict__["is_batchable_method"] is method_before
    report = register(override=True)
    assert report.replaced == ("SMEdit",) and "SMEdit" not in report.added
    assert alg_dict["SMEdit"] is not someone_elses_smedit and alg_dict["SMEdit"]._smedit_method == "SMEdit"


def test_builtin_names_are_never_taken(alg_dict) -> None:
    rome = alg_dict["ROME"]
    register()
    assert alg_dict["ROME"] is rome and not hasattr(rome, "_smedit_method")


def test_aliases_and_unknown_names(alg_dict) -> None:
    with pytest.raises(HyperParamsError, match="unknown method"):
        register(["SMEdit", "NoSuchMethod"])
    assert "SMEdit" not in alg_dict
    report = register(["malmen^2", "comeba_hk"])
    assert report.added == ("MALMEN2", "COMEBA-HK")
    assert "SMEdit" not in alg_dict


def test_apply_function_is_imported_on_first_call_only(alg_dict, tmp_path, monkeypatch) -> None:
    module_name = "smedit_registration_probe_module"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent("""
        CALLS = []

        def apply_probe(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                        keep_original_weight=False, **kwargs):
            CALLS.append(dict(copy=copy, return_orig_weights=return_orig_weights,
                              keep_original_weight=keep_original_weight, **kwargs))
            return model, {"w": len(requests)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "RegistrationProbe", MethodSpec(
        "RegistrationProbe", "smedit_plugin.hparams:MethodHyperParams", f"{module_name}:apply_probe", LOCATE_FAMILY,
        batchable=False, summary="test probe"))
    report = register(["RegistrationProbe"])
    assert report.added == ("RegistrationProbe",) and report.batchable == ()
    assert module_name not in sys.modules
    model = object()
    out, weights_copy = alg_dict["RegistrationProbe"](model, None, [{}, {}], None, return_orig_weights=True,
                                                        train_ds=None)
    probe = sys.modules[module_name]
    assert out is model and weights_copy == {"w": 2}
    assert probe.CALLS == [dict(copy=False, return_orig_weights=True, keep_original_weight=False, train_ds=None)]
    sys.modules.pop(module_name)


def test_apply_wrapper_keeps_easyedits_signature() -> None:
    parameters = inspect.signature(make_easyedit_apply("SMEdit")).parameters
    assert list(parameters)[:7] == ["model", "tok", "requests", "hparams", "copy", "return_orig_weights",
                                    "keep_original_weight"]
    assert parameters["copy"].default is False and parameters["keep_original_weight"].default is False
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_transformers_shim_is_idempotent(ee) -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    assert easyedit.install_transformers_shim() == ()
    for name in easyedit.MOVED_TRANSFORMERS_NAMES:
        if hasattr(pytorch_utils, name):
            assert getattr(modeling_utils, name) is getattr(pytorch_utils, name)


def test_importing_the_package_imports_no_easyeditor(tmp_path) -> None:
    result = run_python(textwrap.dedent("""
        import json, sys
        import smedit_plugin, smedit_plugin.easyedit, smedit_plugin.editing
        from smedit_plugin.easyedit import detect_era
        era = detect_era(allow_import=False)
        import transformers.modeling_utils as mu
        print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split('.')[0] == 'easyeditor'),
                          "era": era, "shimmed": hasattr(mu, "apply_chunking_to_forward")}))
    """), tmp_path)
    assert result["loaded"] == [] and result["era"] is None
    assert result["shimmed"] is False, "importing the plugin must not install the transformers shim"
    assert not (tmp_path / "logs").exists()


def test_import_auto_registers(tmp_path) -> None:
    result = run_python(IMPORT_EASYEDIT + textwrap.dedent("""
        import json
        import smedit_plugin.auto as auto
        from easyeditor.util.alg_dict import ALG_DICT
        from easyeditor.editors.batch_editor import BatchEditor
        print(json.dumps({"added": list(auto.REPORT.added),
                          "registered": [n for n in ALG_DICT if getattr(ALG_DICT[n], "_smedit_method", None) == n],
                          "batchable": [n for n in ALG_DICT if BatchEditor.is_batchable_method(n)]}))
    """), tmp_path)
    assert set(result["added"]) == set(METHODS) == set(result["registered"])
    assert {n for n, s in METHODS.items() if s.batchable} <= set(result["batchable"])


def test_register_without_the_documented_import_says_how_to_fix_it(tmp_path) -> None:
    """The PyPI wheel cannot be imported on modern transformers (nor here without torchvision) as is."""
    result = run_python(textwrap.dedent("""
        import json
        from smedit_plugin.easyedit import EasyEditImportError
        from smedit_plugin.registry import register
        try:
            report = register()
        except EasyEditImportError as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            print(json.dumps({"era": report.era}))
    """), tmp_path)
    if "error" not in result:
        assert result["era"] == "C", "only GitHub HEAD imports without the shim"
        pytest.skip("this EasyEdit imports without the shim")
    assert "install_transformers_shim()" in result["error"]
    if importlib.util.find_spec("torchvision") is None:
        assert "tolerate_missing_vision=True" in result["error"]


# -- load_editor on the installed EasyEdit (runs on HEAD in tests/test_easyedit_head.py) ----------------

def test_load_editor_on_the_pypi_wheel_without_cuda_fails_before_loading(ee, monkeypatch) -> None:
    import torch

    if easyedit.detect_era() != "A" or torch.cuda.is_available():
        pytest.skip("needs the PyPI wheel (era A) on a machine without CUDA")
    from smedit_plugin import models
    from smedit_plugin.hparams import MethodHyperParams

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the editor cannot run")

    monkeypatch.setattr(models, "load_model_and_tokenizer", must_not_load)
    hparams = MethodHyperParams(alg_name="SMEdit", model_name="smollm2-135m", device=None)
    with pytest.raises(RuntimeError, match=r"PyPI wheel.*cuda:\{device\}.*GitHub source"):
        easyedit_editor.load_editor(hparams)


@pytest.mark.parametrize("device, index", [(None, 0), (0, 0), (3, 3), ("1", 1), ("cuda", 0), ("cuda:2", 2)])
def test_pypi_device_index(device, index) -> None:
    assert easyedit_editor.pypi_device_index(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "mps", True])
def test_pypi_device_index_rejects_what_the_wheel_cannot_use(device) -> None:
    with pytest.raises(ValueError, match="field 'device'"):
        easyedit_editor.pypi_device_index(device)


def test_describe_model_keeps_easyedits_t5_test_truthful() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
        t5 = T5ForConditionalGeneration(T5Config(d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                                                 vocab_size=16))
    assert easyedit_editor.describe_model(gpt2, "/runs/tiny-gpt2/") == "gpt2:tiny-gpt2"
    assert easyedit_editor.describe_model(gpt2, "/home/matt5/gpt2") == "gpt2:gpt2"  # EasyEdit would see 't5' in the path
    assert easyedit_editor.describe_model(gpt2, "/runs/gpt2-ft5") == "gpt2"  # ... and score a decoder as seq2seq
    assert easyedit_editor.describe_model(gpt2) == "gpt2"
    assert easyedit_editor.describe_model(t5, "google/t5-small") == "t5:t5-small"
    assert "t5" in easyedit_editor.describe_model(t5).lower()
