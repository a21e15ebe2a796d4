"""The scripts in examples/ run end to end on a tiny random SmolLM2-shaped model: what they print and write.

All four scripts start together in one module fixture (each a subprocess with one thread), so the
file costs about as long as the slowest of them. Trained archives, covariance statistics and
EasyEdit's logs go to a temporary folder; the converted SmolLM2 tokenizer comes from the normal cache.
The scripts report which EasyEdit they found: with the 2023 wheel (era A, CI) or none they must say
that they call the apply function directly; with EasyEdit's GitHub source (era C, see
tests/easyedit_env.md) they must go through ``BaseEditor.batch_edit``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("efficacy", "generalization", "specificity")
TIMEOUT = 300


def _arguments(tmp: Path) -> dict[str, list[str]]:
    tiny = ["--model", "tiny-smollm2"]
    return {
        "batch_edit_smedit": tiny + ["--train-records", "8", "--train-batch", "4", "--max-steps", "1", "--rank", "8",
                                     "--n-edits", "4", "--archive", str(tmp / "smedit-archive"), "--no-progress"],
        "sequential_rledit2": tiny + ["--train-records", "8", "--n-edits", "2", "--num-seq", "2", "--max-steps", "1",
                                      "--rank", "8", "--archive", str(tmp / "rledit2-archive"), "--no-progress"],
        "consecutive_comeba_hk": tiny + ["--batches", "2", "--batch-size", "2", "--z-steps", "2", "--cov-samples", "20",
                                         "--stats-dir", str(tmp / "stats")],
        "compare_methods": tiny + ["--train-records", "8", "--n-edits", "4", "--archive-root", str(tmp / "archives"),
                                   "--no-progress"],
    }


class Run:
    """One script started in the background; :meth:`result` waits for it and checks it succeeded."""

    def __init__(self, name: str, args: list[str], tmp: Path) -> None:
        self.out = tmp / f"{name}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.process = subprocess.Popen([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args,
                                         "--out", str(self.out)], cwd=tmp, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.name = name
        self.done: tuple[str, dict[str, Any]] | None = None

    def result(self) -> tuple[str, dict[str, Any]]:
        if self.done is None:
            stdout, stderr = self.process.communicate(timeout=TIMEOUT)
            assert self.process.returncode == 0, f"{self.name} failed:\n{stdout}\n{stderr[-4000:]}"
            self.done = stdout, json.loads(self.out.read_text())
        return self.done


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    tmp = tmp_path_factory.mktemp("examples")
    started = {name: Run(name, args, tmp) for name, args in _arguments(tmp).items()}
    yield started
    for run in started.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


def _in_unit_interval(metrics: dict[str, Any], n_records: int) -> None:
    assert metrics["n_records"] == n_records
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)


def _check_editing_path(stdout: str, result: dict[str, Any], n_records: int) -> None:
    """BaseEditor on era C with EasyEdit's own per-record metrics; otherwise a stated direct call."""
    if result["easyedit_era"] == "C":
        assert result["path"] == "BaseEditor" and "BaseEditor.batch_edit (era C)" in stdout
        summary = result["easyedit"]
        assert summary["n_records"] == n_records
        assert all(0.0 <= summary["post"][k] <= 1.0 for k in ("rewrite_acc", "rephrase_acc", "locality"))
    else:
        assert result["path"] == "apply_function" and result["easyedit"] is None
        assert "apply function directly" in stdout


def test_batch_edit_smedit_trains_edits_and_reports(runs: dict[str, Run]) -> None:
    stdout, result = runs["batch_edit_smedit"].result()
    assert result["trained_now"] and (Path(result["archive"]) / "manifest.json").is_file()
    assert "trained SMEdit on 4 facts" in stdout
    _in_unit_interval(result["before"], 4)
    _in_unit_interval(result["after"], 4)
    assert len(result["answers"]) == 4
    assert all(isinstance(a[k], str) for a in result["answers"] for k in ("prompt", "target_new", "before", "after"))
    assert "4 facts edited in one batch" in stdout and "after SMEdit" in stdout
    _check_editing_path(stdout, result, 4)


def test_batch_edit_goes_through_base_editor_when_easyedit_runs_on_cpu(runs: dict[str, Run]) -> None:
    stdout, result = runs["batch_edit_smedit"].result()
    if result["easyedit_era"] != "C":
        pytest.skip("BaseEditor runs on CPU only with EasyEdit's GitHub source (era C); see tests/easyedit_env.md")
    assert result["path"] == "BaseEditor"
    assert "EasyEdit post" in stdout and result["easyedit"]["post"]["locality"] is not None


def test_sequential_rledit2_scores_every_accumulated_fact(runs: dict[str, Run]) -> None:
    stdout, result = runs["sequential_rledit2"].result()
    n, k = 2, 2
    assert (result["n_edits"], result["num_seq"], result["n_facts"]) == (n, k, n * k)
    assert len(result["edit_seconds_per_batch"]) == k
    _in_unit_interval(result["all_final"], n * k)
    _in_unit_interval(result["unedited"], n * k)
    _in_unit_interval(result["first_batch_unedited"], n)
    _in_unit_interval(result["first_batch_after_its_edit"], n)
    _in_unit_interval(result["first_batch_final"], n)
    assert f"scored {n * k} facts at the end" in stdout
    assert f"batch {k}/{k}" in stdout
    _check_editing_path(stdout, result, n * k)


def test_consecutive_comeba_hk_restores_exactly_and_reloads(runs: dict[str, Run]) -> None:
    stdout, result = runs["consecutive_comeba_hk"].result()
    _in_unit_interval(result["before"], 4)
    _in_unit_interval(result["after"], 4)
    assert result["max_logit_change_while_hooked"] > 0, "the hooks must change the outputs before removal"
    assert result["restored_exactly"] is True and result["reloaded_exactly"] is True
    assert "outputs and parameters restored exactly: True" in stdout
    assert "edited outputs reproduced exactly: True" in stdout
    state = Path(result["state_dir"])
    assert (state / "manifest.json").is_file()
    assert sorted(p.name for p in (state / "v-000001").iterdir()) == ["hook_state.json", "hook_state.safetensors",
                                                                       "version.json"]


def test_compare_methods_prints_the_table_and_writes_rows(runs: dict[str, Run]) -> None:
    stdout, result = runs["compare_methods"].result()
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["unedited", "SMEdit", "MALMEN2"]
    for row in rows:
        assert row["model"] == "tiny-smollm2" and row["n_edits"] == 4
        assert all(0.0 <= row[k] <= 1.0 for k in METRICS)
    assert all(row["train_s_per_edit"] > 0 for row in rows[1:])
    header = next(line for line in stdout.splitlines() if line.startswith("method"))
    assert header.split()[:4] == ["method", "ES", "%", "GS"]
    assert all(any(line.startswith(m) for line in stdout.splitlines()) for m in ("unedited", "SMEdit", "MALMEN2"))
