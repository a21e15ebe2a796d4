"""``smedit sweep`` on a tiny saved model: the grid, nested edit targets from a fixed split, archives reused across
sizes, rows kept at once, score samples, and a sweep killed inside a cell that resumes to the same rows and state."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smedit_plugin.compare.sweep import MACHINE_FIELDS, SweepConfig, read_rows, run_sweep
from smedit_plugin.shipped import HPARAMS_DIR_ENV, hparams_root
from smedit_plugin.testing import tiny_model

FAST = {"SMEdit": {"rank": 8, "n_blocks": 1, "micro_batch_size": 2, "n_epochs": 1},
        "MALMEN1": {"rank": 8, "n_blocks": 1, "micro_batch_size": 2, "n_epochs": 1},
        "COMEBA-HK": {"mom2_n_samples": 20, "v_num_grad_steps": 3}, "MEMIT-C": {"mom2_n_samples": 20, "v_num_grad_steps": 3}}


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, zsre_train_path, zsre_eval_path) -> dict[str, str]:
    """A saved tiny SmolLM2-shaped model, the shipped hparams tree pointing at it (with small settings), small
    ZsRE files, and a private cache: the environment every sweep process of these tests runs in."""
    import yaml

    root = tmp_path_factory.mktemp("sweep-env")
    model, tok = tiny_model("smollm2")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tree = root / "hparams"
    shutil.copytree(hparams_root(), tree)
    for method, changes in FAST.items():
        for path in [tree / method / "smollm2-135m.yaml", tree / "TRAINING" / method / "smollm2-135m.yaml"]:
            if path.is_file():
                data = yaml.safe_load(path.read_text())
                data.update(model_name=str(root / "model"), **{k: v for k, v in changes.items() if k in data})
                path.write_text(yaml.safe_dump(data))
    (root / "train.json").write_text(json.dumps(json.loads(Path(zsre_train_path).read_text())[:12]))
    (root / "eval.json").write_text(json.dumps(json.loads(Path(zsre_eval_path).read_text())[:4]))
    return {HPARAMS_DIR_ENV: str(tree), "SMEDIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
            "root": str(root)}


@pytest.fixture()
def in_env(tiny_env, monkeypatch) -> Path:
    for key, value in tiny_env.items():
        if key != "root":
            monkeypatch.setenv(key, value)
    return Path(tiny_env["root"])


def _config(root: Path, out: Path, **changes) -> SweepConfig:
    base = dict(model="smollm2-135m", dataset="zsre", train_data=root / "train.json", eval_data=root / "eval.json",
                methods=("SMEdit", "MALMEN1"), out=out, protocol="batch", n_edits=(2, 6), train_batch=2,
                progress=False)
    return SweepConfig(**{**base, **changes})


def _edits(rows: list[dict]) -> list[dict]:
    """Rows without what measures the machine (seconds, memory), which two runs of the same cell never share."""
    return sorted(({k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in rows),
                  key=lambda r: (r["cell"], r.get("point") or 0))


def test_batch_sweep_rows_split_and_archive_reuse(in_env, tmp_path) -> None:
    cfg = _config(in_env, tmp_path / "sweep")
    rows = run_sweep(cfg)
    final = {(r["method"], r["total"]): r for r in rows if r.get("point") is None}
    assert set(final) == {("SMEdit", 2), ("SMEdit", 6), ("MALMEN1", 2), ("MALMEN1", 6)}
    split = json.loads((tmp_path / "sweep" / "split.json").read_text())
    assert len(split["edit_pool"]) == 6 and split["edit_pool"][:4] == [f"eval:{i}" for i in range(4)]
    held = [i for i in split["edit_pool"] if i.startswith("train:")]
    assert len(held) == 2 and not set(held) & set(split["train_pool"]) and len(split["train_pool"]) == 10
    for method in ("SMEdit", "MALMEN1"):
        small, large = final[(method, 2)], final[(method, 6)]
        assert large["edit_ids"][:2] == small["edit_ids"], "smaller cells are nested in larger ones"
        assert small["train_ids"] == large["train_ids"] == split["train_pool"]
        assert not set(small["train_ids"]) & set(large["edit_ids"]), "no edit target is ever trained on"
        assert small["archive"] == large["archive"], "the same training settings and records reuse one archive"
        assert [small["trained_now"], large["trained_now"]] == [True, False]
        assert small["settings"]["train"]["n_edits"] == 2 and small["settings"]["train"]["num_seq"] == 1
        for row in (small, large):
            assert 0.0 <= row["efficacy"] <= 1.0 and row["unedited"]["efficacy"] is not None
            assert row["peak_rss_mb"] > 0 and row["edit_s_per_edit"] > 0 and row["score_sample"] == row["total"]
            assert len(row["chunk_seconds"]) == len(row["chunk_peak_mb"]) == 1 and row["chunk_seconds"][0] > 0
    assert len((tmp_path / "sweep" / "rows.jsonl").read_text().splitlines()) == 4
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(cfg)
    again = run_sweep(_config(in_env, tmp_path / "sweep", resume=True))
    assert _edits(again) == _edits(rows), "a resumed sweep never redoes a finished cell"
    assert len((tmp_path / "sweep" / "rows.jsonl").read_text().splitlines()) == 4


def test_score_sample_scores_a_seeded_subset_of_the_edited_facts(in_env, tmp_path) -> None:
    rows = run_sweep(_config(in_env, tmp_path / "sample", methods=("MALMEN1",), n_edits=(6,), score_sample=3,
                             seeds=(0, 1)))
    by_seed = {r["seed"]: r for r in rows}
    for row in by_seed.values():
        assert row["score_sample"] == 3 and len(row["scored_ids"]) == 3 and set(row["scored_ids"]) <= set(row["edit_ids"])
    assert by_seed[0]["edit_ids"] != by_seed[1]["edit_ids"], "each seed draws its own edit targets"


def test_hypernet_steps_replays_a_batch_cell_step_by_step_to_the_sweeps_scores(in_env, tmp_path) -> None:
    """``benchmarks/hypernet_steps.py`` reloads a finished cell's archive and facts; its last step's scores are the
    row's, and each step reports the shift it made."""
    out = tmp_path / "steps-sweep"
    (row,) = run_sweep(_config(in_env, out, methods=("SMEdit",), n_edits=(4,)))
    report = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "hypernet_steps.py"),
                           "--sweep", str(out), "--methods", "SMEdit", "--threads", "1", "--out", str(report)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(report.read_text())["results"]
    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(1, row["settings"]["edit"]["bp_steps"] + 1)) and len(steps) == 2
    for key in ("efficacy", "generalization", "specificity", "portability"):
        assert steps[-1][key] == pytest.approx(row[key], abs=1e-6), key
    assert all(s["step_shift_mean"] > 0 and s["step_shift_max"] >= s["step_shift_mean"] for s in steps)
    assert steps[0]["total_shift_mean"] == pytest.approx(steps[0]["step_shift_mean"])
    assert "sweep row" in done.stdout


def _sweep_command(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smedit_plugin.cli", "sweep", "--model", "smollm2-135m", "--dataset", "zsre",
            "--eval-data", str(root / "eval.json"), "--train-data", str(root / "train.json"), "--methods", "COMEBA-HK",
            "--protocol", "consecutive", "--n-edits", "6", "--batch-size", "1", "--checkpoints", "2,4",
            "--state-every", "1", "--no-progress", "--out", str(out), *extra]


def _state(out: Path) -> dict[str, torch.Tensor]:
    (folder,) = (out / "state").iterdir()
    (version,) = [v for v in (folder / "final").iterdir() if v.is_dir()]
    return load_file(str(version / "hook_state.safetensors"))


@pytest.mark.slow
def test_a_killed_consecutive_run_resumes_to_the_same_rows_and_hook_state(tiny_env, tmp_path) -> None:
    """The COMEBA-HK cell is killed (SIGKILL, whole process group) after its state for some round is saved; the
    resumed sweep ends with the rows and the final hook state of an uninterrupted run, bit for bit."""
    root = Path(tiny_env["root"])
    env = {**os.environ, **{k: v for k, v in tiny_env.items() if k != "root"}}
    straight = subprocess.run(_sweep_command(root, tmp_path / "straight"), env=env, capture_output=True, text=True,
                              timeout=1800)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_command(root, killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while time.time() < deadline:
        progress = next(killed.glob("state/*/progress.json"), None) if killed.is_dir() else None
        # the first save records its folder as pending before any progress exists
        if progress is not None and json.loads(progress.read_text()).get("loop", {}).get("chunks_done", 0) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = json.loads(next(killed.glob("state/*/progress.json")).read_text())["loop"]["chunks_done"]
    assert 3 <= done_before < 6, "killed inside the cell, after some rounds were saved"
    assert not any(r.get("point") is None for r in read_rows(killed)), "the cell had not finished"
    resumed = subprocess.run(_sweep_command(root, killed, "--resume"), env=env, capture_output=True, text=True,
                             timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _edits(read_rows(killed)) == _edits(read_rows(tmp_path / "straight"))
    (final,) = [r for r in read_rows(killed) if r.get("point") is None]
    assert len(final["chunk_seconds"]) == 6, "the rounds edited before the kill keep their seconds"
    assert [r["point"] for r in read_rows(killed) if r.get("point")] == [2, 4]
    one, two = _state(tmp_path / "straight"), _state(killed)
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)


def test_sequential_cells_train_on_as_many_records_as_they_edit(in_env, tmp_path) -> None:
    """RLEdit's protocol: a training trajectory as long as the edited sequence (plus the validation share)."""
    (row,) = run_sweep(_config(in_env, tmp_path / "seq", methods=("SMEdit",), protocol="sequential", n_edits=(2,),
                               num_seq=(2,), train_batch=None))
    val_fraction = row["settings"]["train"]["val_fraction"]
    assert row["total"] == 4 and row["train_records"] == -(-4 // (1 - val_fraction)) == len(row["train_ids"])
    assert (row["settings"]["train"]["n_edits"], row["settings"]["train"]["num_seq"]) == (2, 2)
    assert len(row["chunk_seconds"]) == 2
