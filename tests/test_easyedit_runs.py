"""EasyEdit's own methods and ``--via-easyedit`` inside ``smedit compare``.

In CI (the 2023 wheel, no GPU) EasyEdit cannot run, and the rows must say so without failing the
run or touching the model. With EasyEdit's current source on ``PYTHONPATH`` (era C) the built-ins
FT and MEMIT run on a tiny model, MEMIT's covariance comes from the local text, and COMEBA-HK
through ``BaseEditor`` gives exactly the numbers of our direct run.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from smedit_plugin import easyedit
from smedit_plugin.compare import METRIC_NAMES, CompareConfig, format_table, run_compare
from smedit_plugin.families import Bench, MethodChoice
from smedit_plugin.shipped import easyedit_hparams_root as builtin_hparams_dir
from smedit_plugin.records import load_records
from smedit_plugin.requests import to_requests
from smedit_plugin.easyedit_runs import (EasyEditUnavailable, builtin_hparams_path, easyedit_stats_file, editor_kwargs,
                                         import_runnable_easyedit, load_builtin_hparams, EasyEditRunner,
                                         split_method, summarise_metrics)
from smedit_plugin.evaluation import evaluate_records, score_answers


def _era() -> str | None:
    if importlib.util.find_spec("easyeditor") is None:
        return None
    easyedit.install_transformers_shim()
    easyedit.import_easyeditor(tolerate_missing_vision=True)
    return easyedit.detect_era()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    after = dict(model.named_parameters())
    return set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_split_method_and_hparams_lookup(tmp_path) -> None:
    assert split_method("easyedit:FT") == (True, "FT")
    assert split_method("EasyEdit:MEMIT") == (True, "MEMIT")
    assert split_method("SMEdit") == (False, "SMEdit")
    with pytest.raises(ValueError, match="names no EasyEdit method"):
        split_method("easyedit:")
    assert builtin_hparams_path("FT", "smollm2-135m", builtin_hparams_dir()).name == "smollm2-135m.yaml"
    with pytest.raises(FileNotFoundError, match="ROME/smollm2-135m.yaml"):
        builtin_hparams_path("ROME", "smollm2-135m", tmp_path)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("hparams/EASYEDIT/*/*.yaml")))
def test_bundled_easyedit_yamls_name_their_method(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert data["alg_name"] == path.parent.name and data["model_name"] == path.stem


def test_compare_rejects_bad_easyedit_folder(tmp_path, zsre_eval_path) -> None:
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["easyedit:FT"], easyedit_hparams=tmp_path / "missing")
    with pytest.raises(ValueError, match="--easyedit-hparams"):
        run_compare(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2023 wheel runs on a GPU")
def test_builtin_rows_say_why_when_easyedit_cannot_run(tiny, zsre_eval_path) -> None:
    """Era A without CUDA (CI): every easyedit: row carries the reason; the run and the model survive."""
    if _era() != "A":
        pytest.skip("needs the 2023 EasyEdit wheel (what CI installs)")
    with pytest.raises(EasyEditUnavailable, match="hard-codes CUDA"):
        import_runnable_easyedit()
    model, tok = tiny("smollm2", n_layers=4)
    before = _params(model)
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["easyedit:FT", "easyedit:MEMIT"], n_edits=3, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    assert [r["method"] for r in rows] == ["unedited", "easyedit:FT", "easyedit:MEMIT"]
    for row in rows[1:]:
        assert "hard-codes CUDA" in row["error"] and row["efficacy"] is None
    assert "easyedit:FT: the installed EasyEdit" in format_table(rows)
    assert _unchanged(model, before)


@pytest.fixture(scope="module")
def head():
    if _era() != "C":
        pytest.skip("needs EasyEdit's current source on PYTHONPATH (tests/easyedit_env.md)")
    return importlib.import_module("easyeditor")


def test_builtins_run_on_the_same_records_and_roll_back(head, tiny, zsre_eval_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))
    model, tok = tiny("smollm2")
    before = _params(model)
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["easyedit:FT", "easyedit:MEMIT", "easyedit:ROME"], n_edits=4, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    by_name = {r["method"]: r for r in rows}
    for name in ("easyedit:FT", "easyedit:MEMIT"):
        row = by_name[name]
        assert "error" not in row, row.get("error")
        assert all(0.0 <= row[k] <= 1.0 for k in METRIC_NAMES)
        assert set(row["easyedit"]) == set(METRIC_NAMES) and 0.0 <= row["easyedit"]["portability"] <= 1.0
        assert row["easyedit_mode"] == "batch_edit, chunks of 4" and row["edit_s_per_edit"] > 0
    assert "ROME/smollm2-135m.yaml" in by_name["easyedit:ROME"]["error"]
    assert _unchanged(model, before)
    hp = head.MEMITHyperParams.from_hparams(str(builtin_hparams_dir() / "MEMIT" / "smollm2-135m.yaml"))
    for layer in hp.layers:
        hp_here = type(hp)(**{**hp.__dict__, "stats_dir": str(tmp_path / "easyedit_stats")})
        assert easyedit_stats_file(hp_here, model, layer).is_file()


def test_seeded_covariance_is_what_easyedit_reads(head, tiny, tmp_path) -> None:
    """EasyEdit's own get_cov returns E[k kᵀ] of the local text, computed independently here."""
    from smedit_plugin.easyedit_runs import seed_covariance_from_text

    model, tok = tiny("smollm2", n_layers=4)
    text = tmp_path / "corpus.txt"
    text.write_text("The capital of France is Paris.\nA quick brown fox jumps over the lazy dog.\n\nRivers flow.\n")
    hp = head.MEMITHyperParams.from_hparams(str(builtin_hparams_dir() / "MEMIT" / "smollm2-135m.yaml"))
    hp = type(hp)(**{**hp.__dict__, "layers": [1, 2], "stats_dir": str(tmp_path / "stats")})
    seed_covariance_from_text(hp, model, tok, text)
    memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
    memit_main.COV_CACHE.clear()  # EasyEdit caches by (model name, layer) across models in one process
    get_cov = memit_main.get_cov
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer)
        cov = get_cov(model, tok, name, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype, hparams=hp)
        keys = []
        handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: keys.append(a[0][0]))
        with torch.no_grad():
            for line in [l for l in text.read_text().splitlines() if l.strip()]:
                model(**tok(line, return_tensors="pt"))
        handle.remove()
        k = torch.cat(keys)
        torch.testing.assert_close(cov, (k.T @ k / len(k)).float(), rtol=1e-5, atol=1e-6)


def test_comeba_hk_through_baseeditor_matches_the_direct_run(head, tiny, zsre_eval_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))
    model, tok = tiny("smollm2")
    before = _params(model)
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["COMEBA-HK"], protocol="consecutive", n_edits=4, batch_size=2, progress=False,
                        via_easyedit=True)
    row = run_compare(cfg, model=model, tok=tok)[1]
    assert row["via_easyedit"] == {k: row[k] for k in METRIC_NAMES}
    assert row["easyedit"]["specificity"] is not None and row["easyedit"]["portability"] is not None
    assert "EasyEdit ES/GS/LS/PS %" in format_table([row])
    assert _unchanged(model, before)


def test_summary_reads_easyedits_portability_dict() -> None:
    """Both eras return ``post.portability.<key>_acc`` as a list per record; no portability stays None, not 0."""
    metrics = [{"post": {"rewrite_acc": [1.0], "locality": {"neighborhood_acc": [1.0]},
                         "portability": {"one_hop_acc": [0.5, 1.0], "alias_acc": [0.0]}}},
               {"post": {"rewrite_acc": [0.0], "locality": {}, "portability": {"one_hop_acc": [1.0]}}}]
    summary = summarise_metrics(metrics)
    assert summary["portability"] == pytest.approx((0.375 + 1.0) / 2)
    assert summary["efficacy"] == 0.5 and summary["specificity"] == 1.0
    for record in metrics:
        record["post"]["portability"] = {}
    assert summarise_metrics(metrics)["portability"] is None


def test_wheel_batch_edit_receives_portability_inputs_and_its_dict_is_read_back(tiny, zsre_eval_path,
                                                                                monkeypatch) -> None:
    """Era A: the 2023 wheel's own ``BaseEditor.batch_edit`` and ``_prepare_requests`` with our keyword arguments.

    The wheel hard-codes CUDA in its constructor and its metric code, so the editor is built without
    its constructor and its ``compute_edit_quality`` scores on CPU, returning the wheel's dict shape.
    """
    if _era() != "A":
        pytest.skip("needs the 2023 EasyEdit wheel (CI leg 2)")
    editor_module = importlib.import_module("easyeditor.editors.editor")
    model, tok = tiny("smollm2", n_layers=2)
    records = load_records(Path(zsre_eval_path), "zsre")[:3]
    seen = []

    def compute_edit_quality(model, model_name, hparams, tok, request, device, test_generation=False):
        seen.append(copy.deepcopy(request))
        portability = {f"{key}_acc": [s.accuracy for s in score_answers(model, tok, [probe["prompt"]],
                                                                         [probe["ground_truth"]])]
                       for key, probe in request["portability"].items()}
        return {"rewrite_acc": [0.0], "locality": {}, "portability": portability}

    monkeypatch.setattr(editor_module, "compute_edit_quality", compute_edit_quality)
    editor = object.__new__(editor_module.BaseEditor)
    editor.alg_name, editor.model, editor.tok, editor.model_name = "MEMIT", model, tok, "llama:tiny-smollm2"
    editor.hparams = SimpleNamespace(batch_size=3, device=0)
    editor.apply_algo = lambda model, tok, requests, hparams, **kwargs: (model, {})
    metrics, _, _ = editor.batch_edit(**editor_kwargs(records, batch=True, era="A"), verbose=False)
    expected = to_requests(records)
    assert [r["portability"] for r in seen[:3]] == [r["portability"] for r in expected]
    assert [r["locality"] for r in seen[:3]] == [r["locality"] for r in expected]
    ours = evaluate_records(model, tok, records, dataset="zsre", progress=False)["portability"]
    assert summarise_metrics(metrics)["portability"] == pytest.approx(ours)
    requests = editor_module.BaseEditor._prepare_requests(None, **editor_kwargs(records, batch=False, era="A"))
    assert requests == expected


def test_portability_inputs_reach_the_current_baseeditor(head, tiny, zsre_eval_path, tmp_path, monkeypatch) -> None:
    """Era C: EasyEdit's own FT through ``batch_edit`` in chunks; its requests carry our questions, its dict is read."""
    monkeypatch.chdir(tmp_path)
    model, tok = tiny("smollm2")
    before = _params(model)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    run = EasyEditRunner(Bench(model, tok, "smollm2-135m", "zsre"), MethodChoice("easyedit:FT", "FT"))
    run.prepare()
    try:
        seconds = [run.edit(records[:2]), run.edit(records[2:])]
        assert all(s > 0 for s in seconds) and run.mode == "batch_edit, chunks of 2"
    finally:
        run.roll_back()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the runner rolls FT back exactly"
    assert len(run.metrics) == 4
    expected = [r["portability"] for r in to_requests(records)]
    assert [m["requested_rewrite"]["portability"] for m in run.metrics] == expected
    per_record = [float(torch.tensor(m["post"]["portability"]["one_hop_acc"], dtype=torch.float).mean())
                  for m in run.metrics]
    assert run.report()["easyedit"]["portability"] == pytest.approx(sum(per_record) / 4)
