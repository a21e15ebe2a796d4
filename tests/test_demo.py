"""`smedit demo`: the facts it picks, how it judges an answer, and (slow) that a person watching sees facts change."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from smedit_plugin.cli import main
from smedit_plugin.commands.demo import _answers_table, demo_records, gives_target


def test_demo_facts_are_packaged_evaluation_records_with_distinct_subjects() -> None:
    records = demo_records(8)
    assert len(records) == 8
    assert len({r.subject for r in records}) == 8
    assert demo_records(3) == records[:3]
    with pytest.raises(ValueError, match="--n-edits"):
        demo_records(0)
    with pytest.raises(ValueError, match="distinct subjects"):
        demo_records(10_000)


def test_an_answer_gives_the_target_only_when_it_starts_with_it() -> None:
    assert gives_target("Lamiinae, which", "Lamiinae")
    assert gives_target("mat-49 is a", " MAT-49")
    assert not gives_target("The answer is Lamiinae", "Lamiinae")
    assert not gives_target("Lami", "Lamiinae")


def test_the_answers_table_marks_only_answers_with_the_new_target() -> None:
    rows = [{"prompt": "Q1?", "target_new": "Paris", "before": "Rome", "after": "Paris.", "gives_target": True},
            {"prompt": "Q2?" + "x" * 80, "target_new": "Lyon", "before": "Nice", "after": "Nice", "gives_target": False}]
    lines = _answers_table(rows).splitlines()
    assert lines[0].split() == ["prompt", "new", "target", "answer", "before", "answer", "after"]
    assert lines[2].rstrip().endswith("✓") and not lines[3].rstrip().endswith("✓")
    assert "…" in lines[3]


@pytest.mark.slow
def test_the_demo_visibly_edits_unseen_facts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.json"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    shown = capsys.readouterr().out
    assert result["method"] == "COMEBA-HK" and result["n_edits"] == 8
    assert result["after"]["efficacy"] >= 0.6 > result["before"]["efficacy"]
    assert result["answers_with_new_target"] >= result["n_edits"] / 2
    assert sum(a["gives_target"] for a in result["answers"]) == result["answers_with_new_target"]
    assert f"{result['answers_with_new_target']} of 8 edited answers now start with their new target" in shown
    assert "time: load model" in shown
