"""EasyEdit's own methods and ``--via-easyedit`` inside ``smedit compare``.

In CI (the 2023 wheel, no GPU) EasyEdit cannot run, and the rows must say so without failing the
run or touching the model. With EasyEdit's current source on ``PYTHONPATH`` (era C) the built-ins
FT and MEMIT run on a tiny model, MEMIT's covariance comes from the local text, and COMEBA-HK
through ``BaseEditor`` gives exactly the numbers of our direct run.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from smedit_plugin import easyedit
from smedit_plugin.compare import METRIC_NAMES, CompareConfig, format_table, run_compare
from smedit_plugin.families import Bench, MethodChoice
from smedit_plugin.shipped import easyedit_hparams_root as builtin_hparams_dir
from smedit_plugin.records import load_records
from smedit_plugin.requests import to_requests
from smedit_plugin.easyedit_runs import (EasyEditUnavailable, builtin_hparams_path, easyedit_stats_file, editor_kwargs,
                                         flatten_nested, import_runnable_easyedit, load_builtin_hparams, EasyEditRunner,
                                         summarise_metrics, unflatten_nested)
from smedit_plugin.compare.config import split_method
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
    """The folder is the ``easyedit:`` name: EasyEdit's method, or a variant of it (FT-M, FT-L are EasyEdit's FT)."""
    data = yaml.safe_load(path.read_text())
    method = path.parent.name
    assert data["alg_name"] == method or method.startswith(data["alg_name"] + "-")
    assert data["model_name"] == path.stem


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


@pytest.mark.easyedit_head
def test_builtins_run_on_the_same_records_and_roll_back(head, tiny, zsre_eval_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))
    model, tok = tiny("smollm2")
    before = _params(model)
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["easyedit:FT", "easyedit:MEMIT", "easyedit:WISE"], n_edits=4, progress=False)
    rows = run_compare(cfg, model=model, tok=tok)
    by_name = {r["method"]: r for r in rows}
    for name in ("easyedit:FT", "easyedit:MEMIT"):
        row = by_name[name]
        assert "error" not in row, row.get("error")
        assert all(0.0 <= row[k] <= 1.0 for k in METRIC_NAMES)
        assert set(row["easyedit"]) == set(METRIC_NAMES) and 0.0 <= row["easyedit"]["portability"] <= 1.0
        assert row["easyedit_mode"] == "batch_edit, chunks of 4" and row["edit_s_per_edit"] > 0
    assert "WISE/smollm2-135m.yaml" in by_name["easyedit:WISE"]["error"]
    assert _unchanged(model, before)
    hp = head.MEMITHyperParams.from_hparams(str(builtin_hparams_dir() / "MEMIT" / "smollm2-135m.yaml"))
    for layer in hp.layers:
        hp_here = type(hp)(**{**hp.__dict__, "stats_dir": str(tmp_path / "easyedit_stats")})
        assert easyedit_stats_file(hp_here, model, layer).is_file()


@pytest.mark.easyedit_head
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


@pytest.mark.easyedit_head
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


@pytest.mark.easyedit_head
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


# -- EasyEdit's baselines in the consecutive protocol (issue 29 point 3) ------------------------------------------

_SHIPPED = sorted(builtin_hparams_dir().glob("*/smollm2-135m.yaml"))


def _model_state(model) -> dict:
    """The model object for object: modules (identity, type, attributes), parameters (values, requires_grad), config."""
    return {"modules": {name: (id(m), type(m), {k: v for k, v in vars(m).items() if not isinstance(v, dict)},
                               {k: dict(v) for k, v in vars(m).items() if isinstance(v, dict) and k != "_buffers"})
                        for name, m in model.named_modules()},
            "params": {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "config": dict(vars(model.config))}


def _assert_same_model(state: dict, model) -> None:
    now = _model_state(model)
    assert now["modules"] == state["modules"]
    assert {n: v[:2] for n, v in now["params"].items()} == {n: v[:2] for n, v in state["params"].items()}
    assert all(torch.equal(now["params"][n][2], state["params"][n][2]) for n in state["params"])
    assert all(torch.equal(now["buffers"][n], state["buffers"][n]) for n in state["buffers"])
    assert now["config"] == state["config"]


def _quick_yaml_folder(root: Path, method: str, **changes) -> Path:
    """The shipped YAML of ``method`` with fewer optimisation steps, in a folder laid out like EasyEdit's hparams/."""
    data = yaml.safe_load((builtin_hparams_dir() / method / "smollm2-135m.yaml").read_text())
    (root / method).mkdir(parents=True, exist_ok=True)
    (root / method / "smollm2-135m.yaml").write_text(yaml.safe_dump({**data, **changes}))
    return root


def _runner(tiny, tmp_path: Path, method: str, **changes) -> tuple[EasyEditRunner, object, object]:
    """A prepared runner for EasyEdit's ``method`` on a fresh tiny SmolLM2 with a quick YAML (``changes``); with the
    model and tokenizer it edits."""
    folder = _quick_yaml_folder(tmp_path / "hparams", method, **changes)
    model, tok = tiny("smollm2")
    run = EasyEditRunner(Bench(model, tok, "smollm2-135m", "zsre", easyedit_hparams=folder),
                         MethodChoice(f"easyedit:{method}", method))
    return run, model, tok


@pytest.mark.easyedit_head
@pytest.mark.parametrize("path", _SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_yamls_load_with_easyedits_own_classes(head, path: Path) -> None:
    """Each YAML is EasyEdit's: its class loads it, its method is registered; edit layers are COMEBA-HK's (2-6)."""
    hp = load_builtin_hparams(path.parent.name, "smollm2-135m", builtin_hparams_dir())
    assert type(hp).__module__.startswith("easyeditor.")
    assert hp.alg_name in importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    comeba = yaml.safe_load((builtin_hparams_dir().parent / "COMEBA-HK" / "smollm2-135m.yaml").read_text())
    if path.parent.name in ("MEMIT", "AlphaEdit", "FT-M", "FT-L", "LoRA"):
        assert list(hp.layers) == comeba["layers"]
    if hasattr(hp, "inner_params"):
        assert hp.inner_params == ["model.layers[6].mlp.down_proj.weight"]
    if hasattr(hp, "rewrite_module_tmp"):
        assert "mlp.down_proj" in hp.rewrite_module_tmp


@pytest.mark.easyedit_head
def test_alphaedit_chunks_accumulate_as_easyedits_own_sequential_editing(head, tiny, zsre_eval_path, tmp_path,
                                                                         monkeypatch) -> None:
    """Two chunks through the runner = one sequential ``batch_edit`` over both in EasyEdit's own editor, bit for bit:
    the second chunk sees the first one's edits and its keys in ``cache_c``; roll back restores model and state."""
    from smedit_plugin.easyedit_editor import load_editor
    from smedit_plugin.easyedit_runs import method_module, module_state_undo

    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    run, model, _ = _runner(tiny, tmp_path, "AlphaEdit", v_num_grad_steps=3)
    state = _model_state(model)
    run.prepare()
    assert Path(run.hparams.P_loc).is_file() and Path(run.hparams.P_loc).is_relative_to(tmp_path / "cache")
    alpha = method_module("AlphaEdit")
    torch.manual_seed(0)
    run.edit(records[:2])
    after_one = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache_one = alpha.cache_c.clone()
    run.edit(records[2:])
    assert run.mode == "batch_edit, chunks of 2"
    assert cache_one.abs().sum() > 0 and not torch.equal(alpha.cache_c, cache_one), "cache_c carries both chunks' keys"
    ours = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(ours[n], after_one[n]) for n in ours)
    run.roll_back()
    _assert_same_model(state, model)
    assert not alpha.cache_c_new and not hasattr(alpha, "cache_c") and not alpha.P_loaded, "EasyEdit's state is reset"
    assert not (tmp_path / "null_space_project.pt").exists(), "P comes from the runner's cache, not the working folder"

    twin, twin_tok = tiny("smollm2")
    editor = load_editor(dataclasses.replace(run.hparams, batch_size=2), twin, twin_tok)
    undo = module_state_undo(alpha)  # EasyEdit's own run leaves cache_c behind for later tests otherwise
    try:
        torch.manual_seed(0)
        editor.batch_edit(**editor_kwargs(records, batch=True, era="C"), sequential_edit=True, verbose=False)
    finally:
        undo()
    theirs = dict(twin.named_parameters())
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def _two_chunks_saved_between(tiny, tmp_path: Path, method: str, records, **changes) -> tuple:
    """A resumable run of ``method`` that edits ``records[:2]``, saves its state to ``tmp_path/state``, then edits
    ``records[2:]``; with its model and tokenizer."""
    run, model, tok = _runner(tiny, tmp_path, method, **changes)
    run.prepare()
    assert run.resumable
    torch.manual_seed(0)
    run.edit(records[:2])
    run.save_state(tmp_path / "state")
    run.edit(records[2:])
    return run, model, tok


def _whole_run_then_a_fresh_one(tiny, tmp_path: Path, method: str, records, edits, **changes) -> tuple:
    """:func:`_two_chunks_saved_between`, then ``edits(model)`` and the logits (eval mode) of the last record's prompt,
    roll back; and a prepared runner on a fresh model to load the state into, with that model and its state."""
    run, model, tok = _two_chunks_saved_between(tiny, tmp_path, method, records, **changes)
    whole = edits(model)
    ids = tok(records[-1].prompt, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    run.roll_back()
    again, twin, _ = _runner(tiny, tmp_path / "again", method, **changes)
    state = _model_state(twin)
    again.prepare()
    return whole, logits, ids, again, twin, state


@pytest.mark.easyedit_head
def test_an_alphaedit_run_saved_after_one_chunk_continues_in_a_fresh_model_bit_for_bit(head, tiny, zsre_eval_path,
                                                                                      tmp_path, monkeypatch) -> None:
    """Chunk 1, save, then chunk 2 in a fresh model and a reset EasyEdit = the two chunks in one run: the same weights,
    the same ``cache_c`` and EasyEdit's metrics of both chunks; roll back then restores the unedited model and state."""
    from smedit_plugin.easyedit_runs import method_module, module_state_undo

    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    alpha = method_module("AlphaEdit")
    fresh_process = module_state_undo(alpha)  # EasyEdit's globals as a new process has them
    run, model, _ = _two_chunks_saved_between(tiny, tmp_path, "AlphaEdit", records, v_num_grad_steps=3)
    whole = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole_cache = alpha.cache_c.clone()
    run.roll_back()
    fresh_process()

    again, twin, _ = _runner(tiny, tmp_path / "again", "AlphaEdit", v_num_grad_steps=3)
    state = _model_state(twin)
    again.prepare()
    again.load_state(tmp_path / "state")
    assert len(again.metrics) == 2
    torch.manual_seed(1)  # the context templates come from the saved state, not from sampling again
    again.edit(records[2:])
    assert all(torch.equal(whole[n], p) for n, p in twin.named_parameters())
    assert torch.equal(alpha.cache_c, whole_cache) and len(again.metrics) == 4
    again.roll_back()
    _assert_same_model(state, twin)
    assert not alpha.cache_c_new and not hasattr(alpha, "cache_c")


@pytest.mark.easyedit_head
def test_a_lora_run_saved_after_one_chunk_continues_in_a_fresh_model_bit_for_bit(head, tiny, zsre_eval_path,
                                                                                 tmp_path, monkeypatch) -> None:
    """LoRA's adapters go into the state: chunk 1, save, chunk 2 in a fresh model (which LoRA wraps in PEFT's model
    again at load) = both chunks in one run, with dropout drawing from the restored generator; roll back removes
    PEFT from the fresh model."""
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    adapters, whole_logits, ids, again, twin, state = _whole_run_then_a_fresh_one(
        tiny, tmp_path, "LoRA", records, lambda m: {n: p.detach().clone() for n, p in m.named_parameters()
                                                    if "lora_" in n}, num_steps=2)
    broken = tmp_path / "broken"  # adapters of other hparams: refused after LoRA wrapped the model, which is undone
    shutil.copytree(tmp_path / "state", broken)
    save_file({**load_file(str(broken / "added.safetensors")), "model.extra.lora_A.default.weight": torch.zeros(2)},
              str(broken / "added.safetensors"))
    with pytest.raises(ValueError, match="added other parameters.*model.extra.lora_A"):
        again.load_state(broken)
    _assert_same_model(state, twin)
    torch.manual_seed(123)  # the generator's state comes from the saved run
    again.load_state(tmp_path / "state")
    assert len(again.metrics) == 2 and hasattr(twin, "peft_config")
    again.edit(records[2:])
    resumed = {n: p.detach() for n, p in twin.named_parameters() if "lora_" in n}
    assert adapters and resumed.keys() == adapters.keys()
    assert all(torch.equal(adapters[n], resumed[n]) for n in adapters)
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, whole_logits)
    again.roll_back()
    _assert_same_model(state, twin)


def test_adaptor_attributes_nested_thousands_deep_are_saved_and_read_back(tmp_path) -> None:
    """GRACE's ``edit_ids`` nest one level deeper per key (``[[[id0], id1], id2]``): 5,000 levels, lists, tuples,
    tensors and scalars go through ``torch.save`` and ``torch.load(weights_only=True)`` unchanged (pickling the
    nested list itself fails with RecursionError at a few hundred levels)."""
    deep: list = ["e0"]
    for i in range(1, 5000):
        deep = [deep, f"e{i}"]
    values = {"edit_ids": deep, "key_labels": [torch.arange(3), (1, [2.5, None], ()), []], "key_id": torch.tensor(7),
              "iter": 49, "training": False}
    with pytest.raises(RecursionError):
        torch.save(deep, tmp_path / "plain.pt")
    torch.save({k: flatten_nested(v) for k, v in values.items()}, tmp_path / "flat.pt")
    back = {k: unflatten_nested(*v) for k, v in torch.load(tmp_path / "flat.pt", weights_only=True).items()}
    node, depth = back["edit_ids"], 0
    while isinstance(node, list) and len(node) == 2:
        assert node[1] == f"e{4999 - depth}"
        node, depth = node[0], depth + 1
    assert node == ["e0"] and depth == 4999
    labels = back["key_labels"]
    assert torch.equal(labels[0], torch.arange(3)) and labels[1] == (1, [2.5, None], ()) and labels[2] == []
    assert torch.equal(back["key_id"], torch.tensor(7)) and back["iter"] == 49 and back["training"] is False


def _codebook(model) -> tuple:
    adaptor = model.model.layers[6].mlp.down_proj
    return (adaptor.keys.clone(), adaptor.values.detach().clone(), adaptor.epsilons.clone(),
            copy.deepcopy(adaptor.edit_ids), [t.clone() for t in adaptor.key_labels], adaptor.key_id)


@pytest.mark.easyedit_head
def test_a_grace_run_saved_after_one_chunk_continues_in_a_fresh_model_bit_for_bit(head, tiny, zsre_eval_path,
                                                                                  tmp_path, monkeypatch) -> None:
    """GRACE's codebook adaptor goes into the state: chunk 1, save, chunk 2 in a fresh model = both chunks in one run
    (the same keys, values, radii, labels and key position, the same outputs; GRACE draws ``torch.rand`` in every
    forward, so the generator's state is part of it), and roll back removes the installed adaptor."""
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    whole, whole_logits, ids, again, twin, state = _whole_run_then_a_fresh_one(tiny, tmp_path, "GRACE", records,
                                                                                _codebook, n_iter=5)
    torch.manual_seed(123)  # the generator's state comes from the saved run
    again.load_state(tmp_path / "state")
    assert len(again.metrics) == 2 and len(twin.model.layers[6].mlp.down_proj.keys) == 2
    again.edit(records[2:])
    resumed = _codebook(twin)
    assert all(torch.equal(a, b) for a, b in zip(whole[:3], resumed[:3]))
    assert whole[3] == resumed[3] and all(torch.equal(a, b) for a, b in zip(whole[4], resumed[4]))
    assert int(whole[5]) == int(resumed[5])
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, whole_logits)
    again.roll_back()
    _assert_same_model(state, twin)


@pytest.mark.easyedit_head
def test_grace_gets_one_record_per_call_keeps_its_codebook_across_chunks_and_is_removed(head, tiny, zsre_eval_path,
                                                                                       tmp_path, monkeypatch) -> None:
    """GRACE through the runner: one record per apply call (EasyEdit's non-batchable path); chunk 2 adds to the codebook
    chunk 1 made, which keeps chunk 1's keys and values, and ends with the codebook of EasyEdit's own sequential
    ``edit`` over both chunks; roll back removes the adaptor and puts back the frozen parameters."""
    from smedit_plugin.easyedit_editor import load_editor

    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    apply = alg_dict.ALG_DICT["GRACE"]
    calls: list[int] = []

    @functools.wraps(apply)
    def counting(model, tok, requests, hparams, **kwargs):
        calls.append(len(requests))
        return apply(model, tok, requests, hparams, **kwargs)

    monkeypatch.setitem(alg_dict.ALG_DICT, "GRACE", counting)
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    run, model, _ = _runner(tiny, tmp_path, "GRACE", n_iter=5)
    state = _model_state(model)
    run.prepare()
    run.edit(records[:2])
    adaptor = model.model.layers[6].mlp.down_proj
    keys_one, values_one = adaptor.keys.clone(), adaptor.values.detach().clone()
    run.edit(records[2:])
    assert calls == [1, 1, 1, 1] and run.mode.startswith("edit, one record at a time")
    assert model.model.layers[6].mlp.down_proj is adaptor, "the second chunk edits the same codebook"
    assert len(adaptor.keys) == len(adaptor.values) == len(adaptor.epsilons) == 4
    assert torch.equal(adaptor.keys[:2], keys_one) and torch.equal(adaptor.values[:2], values_one)
    ours = (adaptor.keys.clone(), adaptor.epsilons.clone(), copy.deepcopy(adaptor.edit_ids))
    run.roll_back()
    _assert_same_model(state, model)

    twin, twin_tok = tiny("smollm2")
    editor = load_editor(run.hparams, twin, twin_tok)
    editor.edit(**editor_kwargs(records, batch=False, era="C"), sequential_edit=True, verbose=False)
    theirs = twin.model.layers[6].mlp.down_proj
    # values start from torch.rand, which GRACE also draws in every forward once it has keys; keys and radii do not
    assert torch.equal(ours[0], theirs.keys) and torch.equal(ours[1], theirs.epsilons) and ours[2] == theirs.edit_ids


@pytest.mark.easyedit_head
def test_lora_adapters_accumulate_and_their_training_setup_is_undone(head, tiny, zsre_eval_path, tmp_path,
                                                                     monkeypatch) -> None:
    """LoRA through the runner: chunk 2 trains the adapters chunk 1 made; roll back removes them and PEFT's side
    effects (``peft_config``, gradient checkpointing, frozen weights, ``config.use_cache``)."""
    monkeypatch.chdir(tmp_path)
    records = load_records(Path(zsre_eval_path), "zsre")[:4]
    run, model, _ = _runner(tiny, tmp_path, "LoRA", num_steps=2)
    state = _model_state(model)
    run.prepare()
    run.edit(records[:2])
    lora = model.model.layers[2].self_attn.q_proj
    lora_b = lora.lora_B["default"].weight.detach().clone()
    assert hasattr(model, "peft_config") and model.config.use_cache is False
    run.edit(records[2:])
    assert model.model.layers[2].self_attn.q_proj is lora and not torch.equal(lora.lora_B["default"].weight, lora_b)
    assert not hasattr(model.model.layers[1].self_attn.q_proj, "lora_A"), "adapters only on layers 2-6"
    run.roll_back()
    _assert_same_model(state, model)
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())


@pytest.mark.easyedit_head
def test_a_method_easyedit_cannot_run_on_the_model_gives_a_row_that_says_why(head, tiny, zsre_eval_path, tmp_path,
                                                                             monkeypatch) -> None:
    """EasyEdit's AlphaEdit sizes its key cache only for models it recognises by name (Llama, Qwen, GPT-2 XL): on
    Gemma-3 its row carries EasyEdit's error, the run goes on and the model is as it was."""
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    model, tok = tiny("gemma-3", n_layers=30)  # the YAML's v_loss_layer is 29
    state = _model_state(model)
    cfg = CompareConfig(model="smollm2-135m", dataset="zsre", train_data=None, eval_data=Path(zsre_eval_path),
                        methods=["easyedit:AlphaEdit"], protocol="consecutive", n_edits=2, batch_size=1,
                        progress=False)
    row = run_compare(cfg, model=model, tok=tok)[1]
    assert "EasyEdit's AlphaEdit failed on this model" in row["error"] and "cache_c" in row["error"]
    assert row["efficacy"] is None
    _assert_same_model(state, model)


@pytest.mark.easyedit_head
@pytest.mark.parametrize("method, side", [("FT-M", "left"), ("MEMIT", "right")])
def test_easyedit_methods_see_the_padding_side_easyedits_editor_gives_them(head, tiny, zsre_eval_path, tmp_path,
                                                                           monkeypatch, method, side) -> None:
    """FT and LoRA mask the prompt assuming left padding, MEMIT finds the subject in right-padded batches; EasyEdit sets
    the side only for models it loads by name, so the runner sets it for each call, and puts the tokenizer back."""
    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    alg = yaml.safe_load((builtin_hparams_dir() / method / "smollm2-135m.yaml").read_text())["alg_name"]
    apply = alg_dict.ALG_DICT[alg]
    seen: list[str] = []

    @functools.wraps(apply)
    def spying(model, tok, requests, hparams, **kwargs):
        seen.append(tok.padding_side)
        return apply(model, tok, requests, hparams, **kwargs)

    monkeypatch.setitem(alg_dict.ALG_DICT, alg, spying)
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    steps = {"num_steps": 1} if alg == "FT" else {"v_num_grad_steps": 1}
    run, _, tok = _runner(tiny, tmp_path, method, **steps)
    tok.padding_side = "right" if side == "left" else "left"
    before = tok.padding_side
    run.prepare()
    try:
        run.edit(load_records(Path(zsre_eval_path), "zsre")[:2])
    finally:
        run.roll_back()
    assert seen == [side] and tok.padding_side == before
