"""The ``smedit`` command line: subcommand table, ``info`` and ``base-eval``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from smedit_plugin import cli
from smedit_plugin.commands import base_eval, info
from smedit_plugin.cli import COMMANDS, CommandSpec, main, register_command
from smedit_plugin.methods import METHODS


def test_without_a_command_help_is_printed(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_only_the_chosen_subcommand_is_imported(monkeypatch, capsys) -> None:
    monkeypatch.setitem(COMMANDS, "broken", CommandSpec("never imported unless chosen", "smedit_plugin_missing:setup"))
    monkeypatch.setattr(info, "_easyedit_status", lambda: "stubbed")
    assert main(["info"]) == 0
    assert "easyeditor: stubbed" in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError, match="smedit_plugin_missing"):
        main(["broken"])


def test_register_command_refuses_silent_replacement(monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", dict(COMMANDS))
    register_command("hello", "says hello", "smedit_plugin.commands.info:setup")
    assert cli.COMMANDS["hello"].load() is info.setup
    with pytest.raises(ValueError, match="already exists"):
        register_command("hello", "again", "smedit_plugin.commands.info:setup")
    register_command("hello", "again", "smedit_plugin.commands.base_eval:setup", replace=True)
    assert cli.COMMANDS["hello"].help == "again"
    with pytest.raises(ValueError, match="module:function"):
        register_command("bye", "no colon", "smedit_plugin.info.setup")


def test_info_reports_versions_devices_and_methods(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "easyeditor" else real_find_spec(name, *a))
    lines = dict(line.split(": ", 1) for line in info.info_lines())
    import torch
    import transformers

    assert lines["torch"] == torch.__version__ and lines["transformers"] == transformers.__version__
    assert lines["devices"].startswith("cpu")
    assert lines["easyeditor"] == "not installed"
    assert lines["methods"].split(", ") == list(METHODS)


def test_info_shows_the_easyedit_era_or_why_it_does_not_import(monkeypatch) -> None:
    from smedit_plugin import easyedit

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "easyeditor" else real_find_spec(name, *a))
    monkeypatch.setattr(easyedit, "import_easyeditor", lambda **kw: object())
    monkeypatch.setattr(easyedit, "detect_era", lambda **kw: "C")
    assert info._easyedit_status() == "installed, era C"

    def failing(**kw):
        raise easyedit.EasyEditImportError("cannot import easyeditor (No module named 'av')")

    monkeypatch.setattr(easyedit, "import_easyeditor", failing)
    assert info._easyedit_status() == "installed but fails to import: cannot import easyeditor (No module named 'av')"


def test_base_eval_rejects_bad_input_before_loading_a_model(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("smedit_plugin.models.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("a model was loaded for invalid input"))
    assert main(["base-eval", "--data", str(tmp_path / "none.json")]) == 2
    assert "none.json does not exist" in capsys.readouterr().err
    assert main(["base-eval", "--limit", "0"]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    assert main(["base-eval", "--data", str(bad)]) == 2
    assert "cannot tell the dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_base_eval_on_smollm2_prints_a_table_and_writes_json(smollm2, tmp_path: Path, capsys) -> None:
    from smedit_plugin.records import load_records, sample_path
    from smedit_plugin.evaluation import evaluate_records

    out = tmp_path / "results" / "base.json"
    assert main(["base-eval", "--model", "smollm2-135m", "--limit", "8", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "8 zsre records" in printed and str(out) in printed
    for metric in ("efficacy", "generalization", "specificity", "portability"):
        assert metric in printed
    result = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["base.json"]
    assert (result["model"], result["dataset"], result["n_records"], result["limit"]) == ("smollm2-135m", "zsre", 8, 8)
    assert result["data"] == str(sample_path("zsre_sample_eval"))
    model, tok = smollm2
    direct = evaluate_records(model, tok, load_records(sample_path("zsre_sample_eval"), limit=8), dataset="zsre",
                              progress=False)
    for metric in ("efficacy", "generalization", "specificity", "portability"):
        assert result[metric] == pytest.approx(direct[metric])
        assert len(result["per_example"][metric]) == 8


@pytest.mark.slow
def test_base_eval_reads_counterfact_files(counterfact_train_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cf.json"
    code = main(["base-eval", "--data", str(counterfact_train_path), "--dataset", "counterfact", "--limit", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    assert "2 counterfact records" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["dataset"] == "counterfact"
    assert all(v in (0.0, 1.0) for v in result["per_example"]["efficacy"])
