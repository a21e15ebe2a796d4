"""The cost benchmark runs in CI's smoke mode on a tiny model and reports what its docs say (issue 27.5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mfu_smoke_counts_flops_times_the_run_and_lists_non_matmul_costs(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--smoke", "--methods", "SMEdit",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peak_gflops"] > 0 and result["threads"] == 1
    rows = {row["kind"]: row for row in result["rows"] if row["method"] == "SMEdit"}
    assert set(rows) == {"train", "edit"}
    for row in rows.values():
        assert row["gflop"] > 0 and row["seconds"] > 0 and row["mfu"] > 0
        assert row["mfu"] == pytest.approx(row["gflop"] / row["seconds"] / result["peak_gflops"], rel=1e-9)
        assert row["flops_by_op"]["aten.mm"] > 0
        assert 1 <= len(row["top_non_matmul"]) <= 5
        assert all(not op["op"].startswith(("aten::mm", "aten::addmm", "aten::bmm")) for op in row["top_non_matmul"])
        assert all(0 < op["share"] <= 1 for op in row["top_non_matmul"])
    assert "MFU" in done.stdout
