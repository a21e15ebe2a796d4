"""model_dtype, device and model_parallel are honoured wherever a model is loaded; a missing GPU index gets our error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smedit_plugin import models
from smedit_plugin.devices import resolve_device
from smedit_plugin.hparams import load_hparams


def _two_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("spec", ["cuda:2", 2, "7", torch.device("cuda", 2)])
def test_a_gpu_index_beyond_device_count_names_the_devices_that_exist(monkeypatch, spec) -> None:
    _two_gpus(monkeypatch)
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\) \(cuda:0 to cuda:1\).*'device'"):
        resolve_device(spec)


@pytest.mark.parametrize("spec,expected", [("cuda:1", "cuda:1"), (0, "cuda:0"), ("cuda", "cuda"), (None, "cuda")])
def test_existing_gpus_resolve(monkeypatch, spec, expected) -> None:
    _two_gpus(monkeypatch)
    assert resolve_device(spec) == torch.device(expected)


class _Loaded(Exception):
    """Raised by the stand-in loader once it has recorded its arguments."""


@pytest.fixture
def loader_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def fake_load(name, *, dtype=None, device=None, model_parallel=False):
        calls.append({"name": name, "dtype": dtype, "device": device, "model_parallel": model_parallel})
        raise _Loaded

    monkeypatch.setattr(models, "load_model_and_tokenizer", fake_load)
    return calls


@pytest.mark.parametrize("changes,dtype", [({"model_dtype": "bfloat16"}, "bfloat16"), ({"fp16": True}, "float16"),
                                           ({}, "float32")])
def test_load_model_for_follows_model_dtype_then_fp16(loader_calls, changes, dtype) -> None:
    hp = load_hparams("MALMEN2/smollm2-135m").replace(**{"model_dtype": None, "model_parallel": True, "device": "cpu",
                                                         **changes})
    with pytest.raises(_Loaded):
        models.load_model_for(hp)
    assert loader_calls == [{"name": "smollm2-135m", "dtype": dtype, "device": "cpu", "model_parallel": True}]


def test_load_editor_loads_with_the_hparams_dtype_and_parallelism(loader_calls, monkeypatch) -> None:
    """The model is loaded before EasyEdit's editor class is needed, so EasyEdit's import is stubbed out."""
    from smedit_plugin import easyedit_editor

    monkeypatch.setattr(easyedit_editor, "import_easyeditor", lambda **kwargs: None)
    monkeypatch.setattr(easyedit_editor, "detect_era", lambda **kwargs: "C")
    hp = load_hparams("COMEBA-HK/smollm2-135m").replace(model_dtype="bfloat16", model_parallel=True)
    with pytest.raises(_Loaded):
        easyedit_editor.load_editor(hp)
    assert loader_calls[0]["dtype"] == "bfloat16" and loader_calls[0]["model_parallel"] is True


def test_smedit_train_loads_with_model_parallel_and_model_dtype(loader_calls, tmp_path: Path, zsre_train_path) -> None:
    from smedit_plugin.cli import main

    src = Path(__file__).resolve().parents[1] / "hparams" / "TRAINING" / "MALMEN2" / "smollm2-135m.yaml"
    text = src.read_text().replace("model_parallel: false", "model_parallel: true")
    assert "model_parallel: true" in text
    yaml = tmp_path / "train.yaml"
    yaml.write_text(text)
    with pytest.raises(_Loaded):
        main(["train", str(yaml), "--data", str(zsre_train_path), "--out", str(tmp_path / "archive")])
    assert loader_calls[0]["model_parallel"] is True
    assert loader_calls[0]["dtype"] == "float32"  # the file's model_dtype


def test_compare_loads_the_yaml_model_in_its_dtype_not_the_key(loader_calls, zsre_eval_path) -> None:
    """``smedit compare --model llama3-8b`` loads what the YAML names (a hub id) in bf16, before any training."""
    from smedit_plugin.compare import CompareConfig, run_compare

    cfg = CompareConfig(model="llama3-8b", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["COMEBA-HK", "MEMIT-C"], protocol="consecutive", n_edits=4, batch_size=2)
    with pytest.raises(_Loaded):
        run_compare(cfg)
    hp = load_hparams("COMEBA-HK/llama3-8b")
    assert loader_calls == [{"name": hp.model_name, "dtype": "bfloat16", "device": hp.device,
                             "model_parallel": hp.model_parallel}]
    assert hp.model_name == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_bench_loads_the_yaml_model_in_its_dtype(loader_calls) -> None:
    from smedit_plugin.cli import main

    with pytest.raises(_Loaded):
        main(["bench", "--model", "gpt-j-6b", "--methods", "SMEdit", "--n-edits", "2"])
    hp = load_hparams("SMEdit/gpt-j-6b")
    assert loader_calls[0]["name"] == hp.model_name and loader_calls[0]["dtype"] == hp.model_dtype == "bfloat16"


def test_demo_loads_the_yaml_model_in_its_dtype(loader_calls, monkeypatch) -> None:
    """The demo loads the model its recipe names, in the recipe's dtype, through the one loader."""
    from smedit_plugin.cli import main
    from smedit_plugin.commands import demo

    shipped, name = demo.demo_hparams("COMEBA-HK")
    monkeypatch.setattr(demo, "demo_hparams", lambda method: (shipped.replace(model_dtype="bfloat16"), name))
    with pytest.raises(_Loaded):
        main(["demo", "--no-progress"])
    assert loader_calls == [{"name": shipped.model_name, "dtype": "bfloat16", "device": shipped.device,
                             "model_parallel": shipped.model_parallel}]
