"""The one edit loop: any protocol (:mod:`smedit_plugin.protocols`) with any family runner (:mod:`.families`).

Records are edited chunk by chunk through the runner; under an accumulating protocol the edits stay and
every fact edited so far is scored at the curve points and at the end, otherwise each chunk is scored
alone and rolled back, and the scores are weighted by chunk size. The model is rolled back at the end
(unless the caller keeps the edits) and whenever the loop fails. A long run can save its progress after
any chunk (``after_chunk``) and continue later from there (``resume``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from .evaluation import METRICS, evaluate_records
from .families import FamilyRunner
from .memory import reset_peak, status_mb
from .protocols import Protocol
from .records import EditRecord

#: ``after_chunk(progress)``: runs after each chunk is applied (and its curve point scored), edits in the model.
AfterChunk = Callable[["LoopProgress"], None]


@dataclasses.dataclass
class LoopProgress:
    """Where a loop is: chunks done, the seconds the edits took, the curve points and round scores so far.

    JSON-able (:meth:`to_dict`), so a caller can save it beside the runner's state and resume from it.
    """

    chunks_done: int = 0
    edit_seconds: float = 0.0
    chunk_seconds: list[float] = dataclasses.field(default_factory=list)  # each chunk's edit
    chunk_peak_mb: list[Optional[float]] = dataclasses.field(default_factory=list)  # each chunk's own peak (Linux)
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rounds: list[list[Any]] = dataclasses.field(default_factory=list)  # [facts scored, scores] per rolled-back chunk

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoopResult:
    """Scores of the edited facts (fractions), the curve, and the seconds the edits themselves took."""

    metrics: dict[str, Any]
    curve: list[dict[str, Any]]
    edit_seconds: float
    chunks: int
    progress: LoopProgress


def score(model: Any, tok: Any, records: Sequence[EditRecord], protocol: Protocol, dataset: str,
          reference: Optional[Sequence] = None, progress: bool = False) -> dict[str, Any]:
    """``records`` scored the protocol's way (``reference``: the unedited model's locality predictions)."""
    if protocol.agreement_locality:
        return evaluate_records(model, tok, list(records), dataset=dataset, locality="agreement", reference=reference,
                                scoring="accuracy", progress=progress)
    return evaluate_records(model, tok, list(records), dataset=dataset, progress=progress)


def _weighted(scores: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Chunk scores averaged with the number of facts scored as weights (a metric no chunk has stays None)."""
    out: dict[str, Any] = {}
    for key in METRICS:
        pairs = [(n, m[key]) for n, m in scores if m[key] is not None]
        out[key] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None
    return out


def run_protocol(runner: FamilyRunner, protocol: Protocol, records: Sequence[EditRecord], *, chunk: int,
                 dataset: str, reference: Optional[Sequence] = None, curve_every: int = 0,
                 checkpoints: Sequence[int] = (), score_on: Optional[Sequence[int]] = None,
                 after_chunk: Optional[AfterChunk] = None, resume: Optional[LoopProgress] = None,
                 progress: bool = False, label: str = "", keep_edits: bool = False) -> LoopResult:
    """Edit ``records`` in chunks of ``chunk`` with ``runner`` under ``protocol`` and score them.

    Curve points (accumulating protocols): after every ``curve_every``-th chunk and when the number of facts
    edited reaches a value in ``checkpoints``, every fact edited so far is scored (``result.curve``, the
    final scores last). ``score_on``: indices of the records that are scored (a sample of a large batch;
    every record is still edited); None scores all. ``reference`` (the unedited model's locality
    predictions, one entry per record) is required when the protocol scores locality as agreement.
    ``resume``: the progress of an earlier run of the same loop whose edits the runner has already restored
    into the model; editing continues with the next chunk. ``keep_edits`` leaves the edits in the model
    (the demo); otherwise the runner rolls back at the end.
    """
    if chunk < 1 or not records:
        raise ValueError(f"need a positive chunk size and at least one record, got chunk={chunk}, {len(records)} records")
    model, tok = runner.bench.model, runner.bench.tok
    starts = list(range(0, len(records), chunk))
    marks = set(checkpoints)
    scored = set(range(len(records)) if score_on is None else score_on)
    state = resume or LoopProgress()

    def scored_part(first: int, last: int) -> tuple[list[EditRecord], Optional[list]]:
        picked = [i for i in range(first, last) if i in scored]
        return [records[i] for i in picked], None if reference is None else [reference[i] for i in picked]

    ok = False
    try:
        with tqdm(total=len(records), initial=min(len(records), state.chunks_done * chunk), unit="edit",
                  desc=f"editing {label}".strip(), disable=not progress) as bar:
            for done, start in enumerate(starts[state.chunks_done:], start=state.chunks_done + 1):
                end = min(start + chunk, len(records))
                fresh = reset_peak()
                seconds = runner.edit(records[start:end])
                state.edit_seconds += seconds
                state.chunk_seconds.append(seconds)
                state.chunk_peak_mb.append(status_mb("VmHWM") if fresh else None)
                bar.update(end - start)
                if not protocol.accumulate:
                    facts, ref = scored_part(start, end)
                    if facts:
                        m = score(model, tok, facts, protocol, dataset, ref)
                        state.rounds.append([len(facts), {k: m[k] for k in (*METRICS, "scoring")}])
                    runner.roll_back()
                elif done < len(starts) and ((curve_every and done % curve_every == 0) or end in marks):
                    facts, ref = scored_part(0, end)
                    point = score(model, tok, facts, protocol, dataset, ref)
                    state.curve.append({"num_seq": done, "n_edited": end, **{k: point[k] for k in METRICS}})
                state.chunks_done = done
                if after_chunk is not None:
                    after_chunk(state)
        if protocol.accumulate:
            facts, ref = scored_part(0, len(records))
            metrics = score(model, tok, facts, protocol, dataset, ref, progress)
            if curve_every or marks:
                state.curve.append({"num_seq": len(starts), "n_edited": len(records),
                                    **{k: metrics[k] for k in METRICS}})
        else:
            metrics = {**_weighted(state.rounds), "scoring": state.rounds[0][1]["scoring"]}
        ok = True
    finally:
        if not (ok and keep_edits):
            runner.roll_back()
    return LoopResult(metrics, state.curve, state.edit_seconds, len(starts), state)
