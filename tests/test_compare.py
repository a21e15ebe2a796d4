"""`smedit compare` mechanics on a tiny real-depth SmolLM2-shaped model: rows, curves, archive reuse, plot."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from smedit_plugin.compare import (ROW_FIELDS, CompareConfig, format_general, format_table, method_overrides,
                                   parse_methods, plot_curves, run_compare)
from smedit_plugin.hparams import load_method_hparams
from smedit_plugin.hypernet.archive import read_meta


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, zsre_train_path) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(json.loads(Path(zsre_train_path).read_text())[:16]))
    return path


def test_sequential_compare_rows_curves_and_reuse(tmp_path, tiny, train_file, zsre_eval_path, monkeypatch) -> None:
    model, tok = tiny("smollm2")
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=train_file, eval_data=Path(zsre_eval_path),
                        methods=["SMEdit", "RLEdit1"], protocol="sequential", n_edits=4, num_seq=2,
                        archive_root=tmp_path / "archives", curve_every=1, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [r["method"] for r in rows] == ["unedited", "SMEdit", "RLEdit1"]
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in ("efficacy", "generalization", "specificity", "portability"))
        assert (row["protocol"], row["n_edits"], row["num_seq"]) == ("sequential", 4, 2)
    for row in rows[1:]:
        assert row["train_s_per_edit"] > 0
        assert [p["num_seq"] for p in row["curve"]] == [1, 2]
        assert row["curve"][-1]["efficacy"] == row["efficacy"]
        assert row["curve"][-1]["portability"] == row["portability"]
    png = plot_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(rows)
    assert "SMEdit" in table and "PS %" in table

    def no_training(*args, **kwargs):
        raise AssertionError("a complete archive must be reused, not retrained")

    monkeypatch.setattr("smedit_plugin.hypernet.training.train_hypernet", no_training)
    again = run_compare(cfg, model=model, tok=tok)
    assert [r["train_s_per_edit"] for r in again[1:]] == [r["train_s_per_edit"] for r in rows[1:]]
    assert [r["efficacy"] for r in again] == [r["efficacy"] for r in rows]


def test_compare_rejects_bad_configs(tmp_path, zsre_eval_path) -> None:
    base = dict(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path))
    with pytest.raises(ValueError, match="unknown method 'MALMEN'"):
        run_compare(CompareConfig(methods=["MALMEN"], **base))
    with pytest.raises(ValueError, match="--num-seq 1"):
        run_compare(CompareConfig(methods=["SMEdit"], num_seq=3, **base))
    with pytest.raises(ValueError, match="no curves"):
        plot_curves([{"method": "x"}], tmp_path / "c.png")


def test_method_entries_carry_hparams_overrides() -> None:
    assert parse_methods("SMEdit, SMEdit[reg_coef=0,bp_steps=3],easyedit:FT") == [
        "SMEdit", "SMEdit[reg_coef=0,bp_steps=3]", "easyedit:FT"]
    assert method_overrides("SMEdit[reg_coef=0, bp_steps=3]") == ("SMEdit", {"reg_coef": 0, "bp_steps": 3})
    assert method_overrides("COMEBA-HK[fact_token=subject_last]") == ("COMEBA-HK", {"fact_token": "subject_last"})
    assert method_overrides("MALMEN2") == ("MALMEN2", {})
    with pytest.raises(ValueError, match="not field=value"):
        method_overrides("SMEdit[reg_coef]")


def test_compare_rejects_bad_overrides_before_loading(zsre_eval_path) -> None:
    base = dict(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path))
    with pytest.raises(ValueError, match="no_such_field"):
        run_compare(CompareConfig(methods=["SMEdit[no_such_field=1]"], **base))
    with pytest.raises(ValueError, match="reg_coef"):
        run_compare(CompareConfig(methods=["SMEdit[reg_coef=\"high\"]"], **base))
    with pytest.raises(ValueError, match="--easyedit-hparams"):
        run_compare(CompareConfig(methods=["easyedit:FT[lr=1]"], **base))


def test_variant_trains_its_own_archive_with_its_overrides(tmp_path, tiny, train_file, zsre_eval_path) -> None:
    model, tok = tiny("smollm2")
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=train_file, eval_data=Path(zsre_eval_path),
                        methods=["SMEdit", "SMEdit[reg_coef=0]"], protocol="batch", n_edits=4,
                        archive_root=tmp_path / "archives", progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [r["method"] for r in rows] == ["unedited", "SMEdit", "SMEdit[reg_coef=0]"]
    assert "overrides" not in rows[1] and rows[2]["overrides"] == {"reg_coef": 0}
    assert rows[1]["archive"] != rows[2]["archive"]
    coefs = [read_meta(Path(r["archive"]))["hparams"]["reg_coef"] for r in rows[1:]]
    shipped = load_method_hparams("SMEdit", "smollm2-135m", training=True).reg_coef
    assert shipped > 0 and coefs == [shipped, 0.0]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for both protocols, so the tiny model's covariance statistics are computed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("protocol", ["consecutive", "single-round"])
def test_locate_then_edit_protocols(shared_cache, tiny, zsre_eval_path, monkeypatch, protocol) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(shared_cache))
    model, tok = tiny("smollm2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["COMEBA-HK", "MEMIT-C"], protocol=protocol, n_edits=4, batch_size=2, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [r["method"] for r in rows] == ["unedited", "COMEBA-HK", "MEMIT-C"]
    assert rows[0]["specificity"] == 1.0, "the unedited model agrees with itself"
    for row in rows:
        assert set(ROW_FIELDS) <= set(row) and row["num_seq"] == 2 and row["batch_size"] == 2
        values = [row[k] for k in ("efficacy", "generalization", "specificity")]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert row["average"] == pytest.approx(sum(values) / 3)
    after = dict(model.named_parameters())
    assert set(after) == set(before), "hook state must be removed after the run"
    assert all(torch.equal(after[n], before[n]) for n in before), "the model must be rolled back exactly"


def test_general_capability_before_and_after_consecutive_edits(shared_cache, tiny, zsre_eval_path, monkeypatch) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(shared_cache))
    model, tok = tiny("smollm2")
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["MEMIT-C"], protocol="consecutive", n_edits=4, batch_size=2, progress=False,
                        general_every=1, general_items=4, general_tokens=64)
    rows = run_compare(cfg, model=model, tok=tok)
    before, after = rows[0]["general"], rows[1]["general"]
    assert [p["num_seq"] for p in before] == [0] and [p["num_seq"] for p in after] == [1, 2]
    for point in before + after:
        assert set(point["glue"]) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu"}
        assert all(0.0 <= v <= 1.0 for v in point["glue"].values()) and point["perplexity"] > 1.0
    assert after[-1]["perplexity"] != before[0]["perplexity"], "the report must see the edited model"
    table = format_general(rows)
    assert table.count("\n") == 4 and "MEMIT-C" in table and "SST2 %" in table
    with pytest.raises(ValueError, match="--general-items must be an integer >= 1"):
        run_compare(dataclasses.replace(cfg, general_items=0), model=model, tok=tok)


def test_plot_results_draws_bars_without_curves(tmp_path) -> None:
    from smedit_plugin.compare import plot_results

    rows = [{"method": m, "model": "smollm2-135m", "dataset": "zsre", "protocol": "batch", "n_edits": 64, "num_seq": 1,
             "efficacy": e, "generalization": 0.3, "specificity": 0.25} for m, e in (("unedited", 0.18), ("SMEdit", 0.4))]
    rows.append({**rows[0], "method": "easyedit:ROME", "efficacy": None, "error": "no YAML"})
    path = plot_results(rows, tmp_path / "bars.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no scored rows"):
        plot_results(rows[2:], tmp_path / "none.png")


def test_locate_methods_under_the_batch_protocol(shared_cache, tiny, zsre_eval_path, monkeypatch) -> None:
    """COMEBA-HK beside the hypernetwork methods: one step of all n_edits, scored with the batch protocol's metrics."""
    monkeypatch.setenv("SMEDIT_CACHE", str(shared_cache))
    model, tok = tiny("smollm2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["COMEBA-HK"], protocol="batch", n_edits=3, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert rows[1]["batch_size"] == 3 and rows[1]["num_seq"] == 1 and rows[1]["scoring"] == "accuracy"
    assert rows[0]["specificity"] < 1.0, "batch protocol: locality is the gold answer's accuracy, not agreement"
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_portability_is_scored_after_the_edit_and_null_without_questions(shared_cache, tiny, zsre_eval_path,
                                                                         zsre_train_path, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    """Records whose one-hop question asks the edit itself (answer = edit target): each row's PS is its ES.

    Records without portability questions give ``portability: null`` in every row and no PS column; the
    consecutive protocol's edit loop shows its progress.
    (That PS rises with the edit is tested in test_evaluation.py: a tiny random model barely edits.)
    """
    monkeypatch.setenv("SMEDIT_CACHE", str(shared_cache))
    raw = json.loads(Path(zsre_eval_path).read_text())[:3]
    for record in raw:
        record["portability"] = {"New Question": record["src"], "New Answer": record["alt"]}
    asks_the_edit = tmp_path / "asks_the_edit.json"
    asks_the_edit.write_text(json.dumps(raw))
    model, tok = tiny("smollm2")
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=asks_the_edit,
                        methods=["COMEBA-HK"], protocol="batch", n_edits=3, progress=False)
    unedited, edited = run_compare(cfg, model=model, tok=tok)
    assert unedited["portability"] == unedited["efficacy"] and edited["portability"] == edited["efficacy"]
    assert "PS %" in format_table([unedited, edited])

    no_questions = tmp_path / "no_questions.json"
    no_questions.write_text(json.dumps(json.loads(Path(zsre_train_path).read_text())[:2]))
    capsys.readouterr()
    rows = run_compare(dataclasses.replace(cfg, eval_data=no_questions, methods=["MEMIT-C"], protocol="consecutive",
                                           n_edits=2, batch_size=1, progress=True), model=model, tok=tok)
    progress = capsys.readouterr().err
    assert "editing MEMIT-C" in progress and "2/2" in progress
    assert [r["portability"] for r in rows] == [None, None]
    assert json.loads(json.dumps(rows))[1]["portability"] is None
    assert "PS %" not in format_table(rows)
