"""The one edit loop: any protocol (:mod:`smedit_plugin.protocols`) with any family runner (:mod:`.families`).

Records are edited chunk by chunk through the runner; under an accumulating protocol the edits stay and
every fact edited so far is scored at the curve points and at the end, otherwise each chunk is scored
alone and rolled back, and the scores are weighted by chunk size. The model is rolled back at the end
(unless the caller keeps the edits) and whenever the loop fails.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from .evaluation import METRICS, evaluate_records
from .families import FamilyRunner
from .protocols import Protocol
from .records import EditRecord

#: ``after_chunk(chunks_done)``: runs after each chunk is applied, while its edits are in the model.
AfterChunk = Callable[[int], None]


@dataclasses.dataclass
class LoopResult:
    """Scores of the edited facts (fractions), the curve, and the seconds the edits themselves took."""

    metrics: dict[str, Any]
    curve: list[dict[str, Any]]
    edit_seconds: float
    chunks: int


def score(model: Any, tok: Any, records: Sequence[EditRecord], protocol: Protocol, dataset: str,
          reference: Optional[Sequence] = None, progress: bool = False) -> dict[str, Any]:
    """``records`` scored the protocol's way (``reference``: the unedited model's locality predictions)."""
    if protocol.agreement_locality:
        return evaluate_records(model, tok, list(records), dataset=dataset, locality="agreement", reference=reference,
                                scoring="accuracy", progress=progress)
    return evaluate_records(model, tok, list(records), dataset=dataset, progress=progress)


def _weighted(scores: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Chunk scores averaged with the chunk sizes as weights (a metric no chunk has stays None)."""
    out: dict[str, Any] = {}
    for key in METRICS:
        pairs = [(n, m[key]) for n, m in scores if m[key] is not None]
        out[key] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None
    return out


def run_protocol(runner: FamilyRunner, protocol: Protocol, records: Sequence[EditRecord], *, chunk: int,
                 dataset: str, reference: Optional[Sequence] = None, curve_every: int = 0,
                 checkpoints: Sequence[int] = (), after_chunk: Optional[AfterChunk] = None, progress: bool = False,
                 label: str = "", keep_edits: bool = False) -> LoopResult:
    """Edit ``records`` in chunks of ``chunk`` with ``runner`` under ``protocol`` and score them.

    Curve points (accumulating protocols): after every ``curve_every``-th chunk and when the number of facts
    edited reaches a value in ``checkpoints``, every fact edited so far is scored (``result.curve``, the
    final scores last). ``reference`` is required when the protocol scores locality as agreement.
    ``keep_edits`` leaves the edits in the model (the demo); otherwise the runner rolls back at the end.
    """
    if chunk < 1 or not records:
        raise ValueError(f"need a positive chunk size and at least one record, got chunk={chunk}, {len(records)} records")
    model, tok = runner.bench.model, runner.bench.tok
    starts = list(range(0, len(records), chunk))
    marks = set(checkpoints)
    curve: list[dict[str, Any]] = []
    scores: list[tuple[int, dict[str, Any]]] = []
    seconds = 0.0
    ok = False
    try:
        with tqdm(total=len(records), desc=f"editing {label}".strip(), unit="edit", disable=not progress) as bar:
            for done, start in enumerate(starts, start=1):
                batch = records[start:start + chunk]
                seconds += runner.edit(batch)
                bar.update(len(batch))
                if after_chunk is not None:
                    after_chunk(done)
                if not protocol.accumulate:
                    ref = None if reference is None else reference[start:start + chunk]
                    scores.append((len(batch), score(model, tok, batch, protocol, dataset, ref)))
                    runner.roll_back()
                    continue
                edited = start + len(batch)
                if done < len(starts) and ((curve_every and done % curve_every == 0) or edited in marks):
                    seen = records[:edited]
                    ref = None if reference is None else reference[:edited]
                    point = score(model, tok, seen, protocol, dataset, ref)
                    curve.append({"num_seq": done, "n_edited": edited, **{k: point[k] for k in METRICS}})
        if protocol.accumulate:
            metrics = score(model, tok, records, protocol, dataset, reference, progress)
            if curve_every or marks:
                curve.append({"num_seq": len(starts), "n_edited": len(records), **{k: metrics[k] for k in METRICS}})
        else:
            metrics = {**_weighted(scores), "scoring": scores[0][1]["scoring"]}
        ok = True
    finally:
        if not (ok and keep_edits):
            runner.roll_back()
    return LoopResult(metrics, curve, seconds, len(starts))
