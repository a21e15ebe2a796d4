"""Data-parallel training on torch.distributed (gloo, 2 processes on CPU) gives what one process gives.

The workers live in tests/distributed_workers.py (spawned children import them from there).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_workers import CASES, case_hparams, math_case, mismatch_case, run_ranks, shift_and_meta_grad, train_case
from smedit_plugin.distributed import SINGLE, RowReduce


def test_row_reduce_of_one_process_is_the_identity() -> None:
    t = torch.arange(4.0)
    assert SINGLE.sum(t) is t and not SINGLE.active and SINGLE.is_first
    assert RowReduce(1, 3).shard(list(range(8))) == [1, 4, 7]
    try:
        RowReduce(0, 2).check_shardable(1, "SMEdit training batch")
    except ValueError as exc:
        assert "every rank needs at least one" in str(exc) and "micro_batch_size" in str(exc)
    else:
        raise AssertionError("one micro-batch for two ranks was accepted")


def test_shift_normaliser_and_meta_gradient_from_rows_split_over_two_ranks(tmp_path) -> None:
    out = tmp_path / "rank0.pt"
    run_ranks(2, shift_and_meta_grad, str(out))
    split = torch.load(out)
    whole = math_case(SINGLE)
    assert split.keys() == whole.keys()
    for name, value in whole.items():  # float32 sums in another order: equal to ~1e-6 of each tensor's scale
        torch.testing.assert_close(split[name], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()), msg=name)
    assert whole["grad.lamda.weight"].abs().sum() > 0  # the lambda term is in the total once, not twice


def _archive_tensors(path) -> dict[str, torch.Tensor]:
    from smedit_plugin.hypernet.archive import load_archive
    from smedit_plugin.testing import tiny_model

    model, _ = tiny_model("smollm2", n_layers=4)
    editor, meta = load_archive(path, model, case_hparams_of(path))
    return {k: v.detach().clone() for k, v in editor.state_dict().items()}


_HP_OF: dict = {}


def case_hparams_of(path):
    return _HP_OF[str(path)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_write_the_archive_one_process_writes(tmp_path, zsre_train_path, case) -> None:
    """3 training units on 2 gloo ranks (each batch sharded) equal 3 units in one process, to float32 tolerance."""
    single, split = tmp_path / "single", tmp_path / "split"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, only the order of the sums over ranks differs
    try:
        train_case(0, 1, case, str(zsre_train_path), str(single))
    finally:
        torch.set_num_threads(threads)
    run_ranks(2, train_case, case, str(zsre_train_path), str(split))
    _HP_OF[str(single)] = _HP_OF[str(split)] = case_hparams(case)
    # The hypernetwork gradient of every optimiser step: the ranks' sums are taken in another order, so they
    # agree to float32 rounding at the first step (1e-4 of each tensor's norm) and within 3e-2 after it (Adam amplifies the rounding, below).
    steps = list(zip(torch.load(str(single) + ".grads.pt"), torch.load(str(split) + ".grads.pt"), strict=True))
    assert len(steps) >= 3
    for k, (one_step, two_step) in enumerate(steps):
        for g1, g2 in zip(one_step, two_step, strict=True):
            err, norm = float((g2 - g1).norm()), float(g1.norm())
            assert err <= (1e-4 if k == 0 else 3e-2) * norm + 1e-9, f"step {k + 1}: |diff| {err:.2e}, |grad| {norm:.2e}"
    one, two = _archive_tensors(single), _archive_tensors(split)
    initial = _initial_tensors(case)
    # Adam divides each gradient entry by its own running scale, so an entry whose gradient is near zero moves
    # by a visible part of one step (meta_lr) on float32 rounding alone; per tensor, the two archives differ by
    # under 5 % of how far training moved it (a sharding error moves them apart by the whole movement).
    assert_same_training(one, two, initial)
    assert any(not torch.equal(v, initial[k]) for k, v in one.items() if k in initial and "normaliser" not in k)


def assert_same_training(one: dict, two: dict, initial: dict) -> None:
    """Two archives of the same training: per tensor, apart by under 5 % of how far training moved it."""
    for name, value in one.items():
        if name not in initial or "normaliser" in name:  # statistics of rows cached at those (near-equal) weights
            err, norm = float((two[name].double() - value.double()).norm()), float(value.double().norm())
            assert err <= 1e-3 * norm + 1e-9, f"{name}: archives differ by {err:.2e} (norm {norm:.2e})"
            continue
        moved, err = float((value - initial[name]).norm()), float((two[name] - value).norm())
        assert err <= 0.05 * moved + 1e-9, f"{name}: archives differ by {err:.2e}, training moved it {moved:.2e}"


def _initial_tensors(case: str) -> dict[str, torch.Tensor]:
    from smedit_plugin.hypernet.editor import HypernetEditor
    from smedit_plugin.testing import tiny_model

    model, _ = tiny_model("smollm2", n_layers=4)
    hp = case_hparams(case)
    torch.manual_seed(hp.seed)
    return dict(HypernetEditor(model, hp).state_dict())


def test_a_failing_rank_stops_the_run_with_its_error_and_the_last_archive_loads(tmp_path, zsre_train_path) -> None:
    out = tmp_path / "archive"
    with pytest.raises(Exception, match="injected failure on rank 1 in unit 3"):
        run_ranks(2, train_case, "SMEdit", str(zsre_train_path), str(out), 3)
    from smedit_plugin.hypernet.archive import read_meta

    _HP_OF[str(out)] = case_hparams("SMEdit")
    assert read_meta(out)["train_state"]["units_done"] == 2  # the checkpoint after unit 2 is there and loads
    assert _archive_tensors(out)


@pytest.mark.parametrize("field,value", [("reg_coef", 0.05), ("rank", 2)], ids=["reg_coef", "hypernetwork-rank"])
def test_ranks_started_with_other_settings_fail_at_once_naming_the_rank_and_field(tmp_path, field, value) -> None:
    """Issue 26: another reg_coef trained rank 0's meta silently, another hypernetwork rank died in a gloo
    "connection reset"; now every rank stops before the first collective that depends on them."""
    import json

    from smedit_plugin.records import sample_path

    report, out = tmp_path / "report", tmp_path / "archive"
    run_ranks(2, mismatch_case, str(sample_path("zsre_sample")), str(out), field, value, str(report))
    rank0, rank1 = (json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["type"] == rank1["type"] == "SettingsMismatchError", (rank0, rank1)
    assert f"rank 1: {field} = {value!r} (rank 0: {getattr(case_hparams('SMEdit'), field)!r})" in rank0["message"]
    assert "rank 0 reports which" in rank1["message"]
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_smedit_train_under_torchrun_writes_the_one_process_archive(tmp_path, zsre_train_path) -> None:
    """``torchrun --nproc_per_node 2 -m smedit_plugin.cli train ...`` unchanged, against the same command alone."""
    import subprocess
    import sys

    import yaml

    from smedit_plugin.testing import tiny_model

    model, tok = tiny_model("smollm2", n_layers=4)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hp = case_hparams("SMEdit").replace(model_name=str(tmp_path / "model"), max_steps=2)
    (tmp_path / "smedit.yaml").write_text(yaml.safe_dump(hp.to_dict()))
    command = ["-m", "smedit_plugin.cli", "train", str(tmp_path / "smedit.yaml"), "--data", str(zsre_train_path),
               "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "SMEDIT_DIST_TIMEOUT": "120"}
    alone = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "alone")], capture_output=True,
                           text=True, env=env, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *command, "--out", str(tmp_path / "ranks")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("trained SMEdit") == 1 and "data-parallel over 2 processes" in ranks.stdout
    _HP_OF[str(tmp_path / "alone")] = _HP_OF[str(tmp_path / "ranks")] = hp
    one, two = _archive_tensors(tmp_path / "alone"), _archive_tensors(tmp_path / "ranks")
    assert_same_training(one, two, _initial_tensors("SMEdit"))


def test_compare_under_two_ranks_trains_together_and_rank_0_alone_reports(tmp_path, zsre_train_path,
                                                                           zsre_eval_path) -> None:
    """``smedit compare`` under a launcher: both ranks train each archive, rank 0 alone edits and scores, and
    the rows and archives are those of one process."""
    import json
    from pathlib import Path

    from distributed_workers import compare_case, compare_config
    from smedit_plugin.compare import MethodEntry, run_compare
    from smedit_plugin.compare.run import RunContext, method_choice
    from smedit_plugin.families import Bench
    from smedit_plugin.testing import tiny_model

    train = tmp_path / "train.json"
    train.write_text(json.dumps(json.loads(Path(zsre_train_path).read_text())[:16]))
    rows_file = tmp_path / "rows.json"
    run_ranks(2, compare_case, str(train), str(zsre_eval_path), str(tmp_path / "split"), str(rows_file))
    ranks = [json.loads(Path(f"{rows_file}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["trained"] for r in ranks] == [[2, 2], [2, 2]]  # each archive trained once, by both ranks together
    assert [r["rows"] for r in ranks] == [3, 0] and not any(r["in_group"] for r in ranks)
    split = json.loads(rows_file.read_text())
    cfg = compare_config(str(train), str(zsre_eval_path), str(tmp_path / "single"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = tiny_model("smollm2")
        single = run_compare(cfg, model=model, tok=tok)
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in split] == [r["method"] for r in single] == ["unedited", *cfg.methods]
    assert split[0]["efficacy"] == single[0]["efficacy"]
    for one, two in zip(single[1:], split[1:]):
        assert Path(one["archive"]).name == Path(two["archive"]).name  # the same training settings
        (chunk, chunks) = RunContext(cfg, Bench(model, tok, cfg.model, cfg.dataset), [], [], None).training().shape
        hp = method_choice(cfg, MethodEntry.parse(one["method"])).train_hparams.replace(
            n_edits=chunk, num_seq=chunks, val_n_edits=chunk, max_steps=-1)
        _HP_OF[one["archive"]] = _HP_OF[two["archive"]] = hp
        torch.manual_seed(hp.seed)
        from smedit_plugin.hypernet.editor import HypernetEditor

        initial = dict(HypernetEditor(tiny_model("smollm2")[0], hp).state_dict())
        assert_same_training(_archive_tensors_of(one["archive"]), _archive_tensors_of(two["archive"]), initial)
        for metric in ("efficacy", "generalization", "specificity"):
            assert abs(one[metric] - two[metric]) <= 0.02, (one["method"], metric, one[metric], two[metric])


def _archive_tensors_of(path: str) -> dict[str, torch.Tensor]:
    from smedit_plugin.hypernet.archive import load_archive
    from smedit_plugin.testing import tiny_model

    editor, _ = load_archive(path, tiny_model("smollm2")[0], case_hparams_of(path))
    return {k: v.detach().clone() for k, v in editor.state_dict().items()}
