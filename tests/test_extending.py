"""Extending the plugin is the documented steps and nothing else (docs/architecture.md): a throwaway eighth method
and a throwaway protocol, each added at test time, reach everything they should; the family runners roll back
exactly; ``smedit bench`` and the table printer behave."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smedit_plugin.cli import build_parser, main
from smedit_plugin.compare import CompareConfig, run_compare
from smedit_plugin.families import Bench, MethodChoice
from smedit_plugin.hparams import canonical_alg_name, load_hparams, load_method_hparams
from smedit_plugin.methods import HYPERNET_FAMILY, METHODS, MethodSpec
from smedit_plugin.protocols import PROTOCOLS, Protocol
from smedit_plugin.records import load_records
from smedit_plugin.resolve import apply_function, family_runner
from smedit_plugin.shipped import HPARAMS_DIR_ENV, hparams_root
from smedit_plugin.table import format_table

PROBE = "Probe8"


@pytest.fixture()
def eighth_method(tmp_path, monkeypatch) -> str:
    """A new hypernetwork method exactly as the checklist adds one: its folder (an hparams class and an apply
    function), one table entry, and its YAMLs in the hparams tree (here a copy of the tree, via the env var)."""
    package = tmp_path / "probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hparams.py").write_text(textwrap.dedent(f"""
        import dataclasses
        from typing import ClassVar

        from smedit_plugin.methods import alg_names_of
        from smedit_plugin.smedit.hparams import SMEditHyperParams


        @dataclasses.dataclass(kw_only=True)
        class Probe8HyperParams(SMEditHyperParams):
            ALG_NAMES: ClassVar[tuple[str, ...]] = alg_names_of(f"{{__name__}}:Probe8HyperParams")
            alg_name: str = "{PROBE}"
    """))
    (package / "main.py").write_text(textwrap.dedent("""
        from smedit_plugin.hypernet.apply import make_apply_function

        from .hparams import Probe8HyperParams

        apply_probe8_to_model = make_apply_function(Probe8HyperParams, "apply_probe8_to_model")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, PROBE, MethodSpec(PROBE, "probe_pkg.hparams:Probe8HyperParams",
                                                   "probe_pkg.main:apply_probe8_to_model", HYPERNET_FAMILY,
                                                   batchable=True, summary="a throwaway eighth method"))
    tree = tmp_path / "hparams"
    shutil.copytree(hparams_root(), tree)
    for sub in ("", "TRAINING"):
        source = tree / sub / "SMEdit" / "smollm2-135m.yaml"
        target = tree / sub / PROBE / "smollm2-135m.yaml"
        target.parent.mkdir(parents=True)
        target.write_text(source.read_text().replace("alg_name: SMEdit", f"alg_name: {PROBE}"))
    monkeypatch.setenv(HPARAMS_DIR_ENV, str(tree))
    yield PROBE
    for name in [m for m in sys.modules if m == "probe_pkg" or m.startswith("probe_pkg.")]:
        sys.modules.pop(name)


def test_an_eighth_method_is_known_everywhere_the_table_reaches(eighth_method) -> None:
    assert canonical_alg_name("probe8") == PROBE
    hp = load_method_hparams(PROBE, "smollm2-135m")
    assert type(hp).__name__ == "Probe8HyperParams" and hp.alg_name == PROBE
    assert load_hparams(f"TRAINING/{PROBE}/smollm2-135m").n_edits > 0
    assert family_runner(PROBE).trains and apply_function(PROBE).__name__ == "apply_probe8_to_model"
    demo_parser = build_parser(["demo"])[0]._subparsers._group_actions[0].choices["demo"]
    method_option = next(a for a in demo_parser._actions if "--method" in a.option_strings)
    assert PROBE in method_option.choices


@pytest.mark.skipif(importlib.util.find_spec("easyeditor") is None, reason="easyeditor is not installed")
def test_an_eighth_method_reaches_register(eighth_method, easyeditor) -> None:
    from smedit_plugin.registry import register

    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    saved = dict(alg_dict)
    try:
        report = register([PROBE])
        assert report.added == (PROBE,) and PROBE in report.batchable
        assert alg_dict[PROBE]._smedit_method == PROBE
    finally:
        alg_dict.clear()
        alg_dict.update(saved)


def test_an_eighth_method_runs_in_compare(eighth_method, tmp_path, tiny, zsre_train_path, zsre_eval_path) -> None:
    train = tmp_path / "train.json"
    train.write_text(json.dumps(json.loads(Path(zsre_train_path).read_text())[:8]))
    model, tok = tiny("smollm2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=train, eval_data=Path(zsre_eval_path),
                        methods=[PROBE], protocol="batch", n_edits=4, archive_root=tmp_path / "archives",
                        progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [r["method"] for r in rows] == ["unedited", PROBE]
    assert rows[1]["train_s_per_edit"] > 0 and f"{PROBE}-smollm2-135m-zsre-batch-" in rows[1]["archive"]
    assert 0.0 <= rows[1]["efficacy"] <= 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_new_protocol_is_one_declaration(monkeypatch, tmp_path, tiny, zsre_eval_path) -> None:
    """Two chunks, each edited, scored alone with the papers' metrics and rolled back: declared here, nowhere else."""
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    halves = Protocol("halves", "two batches of --n-edits, each scored alone and rolled back", "n_edits",
                      accumulate=False, scoring="meta")
    monkeypatch.setitem(PROTOCOLS, halves.name, halves)
    parser = build_parser(["compare"])[0]._subparsers._group_actions[0].choices["compare"]
    assert "halves" in next(a for a in parser._actions if "--protocol" in a.option_strings).choices
    model, tok = tiny("smollm2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["MEMIT-C"], protocol="halves", n_edits=2, num_seq=2, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [(r["protocol"], r["num_seq"], r["batch_size"]) for r in rows] == [("halves", 2, 2)] * 2
    assert "average" not in rows[1] and 0.0 <= rows[1]["specificity"] <= 1.0  # the papers' metrics, not COMEBA-HK's
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(dict(model.named_parameters())) == set(before)


def test_locate_runner_rolls_back_chunks_and_hook_layers(tmp_path, monkeypatch, tiny, zsre_eval_path) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny("smollm2")
    names = set(dict(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    runner = family_runner("COMEBA-HK")(Bench(model, tok, "smollm2-135m", "zsre", False),
                                        MethodChoice("COMEBA-HK", "COMEBA-HK", load_method_hparams("COMEBA-HK", "smollm2-135m"),
                                                     apply=apply_function("COMEBA-HK")))
    assert runner.prepare() == {} and not runner.trains
    assert runner.edit(records[:2]) > 0 and runner.edit(records[2:]) > 0
    assert set(dict(model.named_parameters())) > names, "the hook layers are in the model while edits are kept"
    runner.roll_back()
    assert set(dict(model.named_parameters())) == names
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_capture_model_undoes_added_and_replaced_modules_hooks_and_parameters(tiny) -> None:
    from smedit_plugin.editing import WeightsSnapshot

    model, _ = tiny("smollm2")
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(input_ids=ids).logits.detach().clone()
    snapshot = WeightsSnapshot(model)
    snapshot.capture_model()
    mlp = model.model.layers[1].mlp
    original = mlp.down_proj
    with torch.no_grad():
        original.weight.mul_(3.0)
    mlp.down_proj = torch.nn.Sequential(original, torch.nn.Linear(original.out_features, original.out_features))
    mlp.register_parameter("extra", torch.nn.Parameter(torch.ones(2)))
    mlp.register_forward_hook(lambda module, args, output: output * 2)
    model.model.add_module("adaptor", torch.nn.Linear(2, 2))
    assert not torch.equal(model(input_ids=ids).logits, expected)
    snapshot.restore()
    assert mlp.down_proj is original and not hasattr(mlp, "extra") and not hasattr(model.model, "adaptor")
    assert not mlp._forward_hooks
    assert torch.equal(model(input_ids=ids).logits, expected)


def test_capture_model_undoes_module_attributes_requires_grad_and_config(tiny) -> None:
    """What training sets up on the side (PEFT, gradient checkpointing, frozen weights, use_cache) is undone too."""
    from smedit_plugin.editing import WeightsSnapshot

    model, _ = tiny("smollm2", n_layers=2)
    layer = model.model.layers[0]
    hooks = layer._forward_hooks
    snapshot = WeightsSnapshot(model)
    snapshot.capture_model()
    model.config.use_cache = False
    model.config.added_by_training = 1
    model.peft_config = {"default": object()}
    layer.gradient_checkpointing = True
    handle = layer.register_forward_hook(lambda module, args, output: output)
    for param in model.parameters():
        param.requires_grad_(False)
    model.train()
    snapshot.restore()
    assert model.config.use_cache is True and not hasattr(model.config, "added_by_training")
    assert not hasattr(model, "peft_config") and layer.gradient_checkpointing is False
    assert all(p.requires_grad for p in model.parameters()) and not model.training and not layer.training
    assert layer._forward_hooks is hooks and not hooks
    handle.remove()  # its weak reference to the table still works


def test_bench_refuses_another_family_before_loading_a_model(capsys, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a refused method")

    monkeypatch.setattr("smedit_plugin.models.load_model_for", no_model)
    assert main(["bench", "--methods", "COMEBA-HK"]) == 2
    err = capsys.readouterr().err
    assert "COMEBA-HK is not one" in err and "hypernetwork method" in err


def test_bench_measures_each_hypernetwork_method(monkeypatch, tmp_path, tiny, capsys) -> None:
    loaded = []

    def tiny_for(hp, name=None):
        loaded.append((hp.model_name, hp.model_dtype))
        return tiny("smollm2")

    monkeypatch.setattr("smedit_plugin.models.load_model_for", tiny_for)
    out = tmp_path / "bench.json"
    assert main(["bench", "--methods", "SMEdit,malmen1", "--n-edits", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["n_edits"], r["bp_steps"]) for r in rows] == [("SMEdit", 4, 2), ("MALMEN1", 4, 1)]
    assert all(r["edit_seconds"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert loaded == [("smollm2-135m", "float32")], "one model, loaded as the first method's YAML says"
    assert "MALMEN1" in capsys.readouterr().out


def test_table_printer_aligns_text_left_and_numbers_right() -> None:
    text = format_table(["method", "ES %"], [["SMEdit", "97.6"], ["MALMEN1", "8.0"]])
    assert text.splitlines() == ["method   ES %", "-------  ----", "SMEdit   97.6", "MALMEN1   8.0"]
    two = format_table(["a", "b", "n"], [["x", "yy", "1"]], left=2)
    assert two.splitlines()[-1] == "x  yy  1"
