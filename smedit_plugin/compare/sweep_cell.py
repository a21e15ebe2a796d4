"""One phase of one sweep cell, in a process of its own: ``python -m smedit_plugin.compare.sweep_cell JOB.json``.

``prepare``: a method that trains trains (or reuses) its archive on the cell's training records. ``edit``: the
cell's edit targets are edited under the protocol and scored (checkpoint rows are appended as they come);
a runner that can save its edits saves them every ``state_every`` chunks and at each checkpoint into
``<out>/state/<cell>/``, and a killed cell continues from there. The result goes to the job's ``result`` file.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..edit_loop import LoopProgress, run_protocol, score
from ..evaluation import METRICS, predict_locality_reference
from ..families import Bench, FamilyRunner, Training
from ..fileio import write_json_atomic
from ..memory import peak_rss_mb
from ..records import EditRecord
from .config import AVERAGED_METRICS, MethodEntry
from .run import load_model, method_choice, runner_class
from .sweep import Cell, Split, SweepConfig, append_row, data_key, records_by_id

PROGRESS = "progress.json"


def load_config(data: dict[str, Any]) -> SweepConfig:
    paths = {"train_data", "eval_data", "out", "easyedit_hparams"}
    tuples = {"methods", "n_edits", "num_seq", "batch_size", "seeds", "checkpoints"}
    return SweepConfig(**{k: (Path(v) if k in paths and v is not None else tuple(v) if k in tuples else v)
                          for k, v in data.items()})


class CellState:
    """``<out>/state/<cell hash>/``: the runner's saved edits in ``c-<chunks done>/`` and ``progress.json``, which
    names that folder with the loop's progress. ``progress.json`` records a folder as ``pending`` before the save
    creates it, so only folders it recorded are ever removed (a save killed midway, or the one a newer save
    replaced); anything else in the folder is refused, never deleted."""

    def __init__(self, out: Path, key: str) -> None:
        self.root = out / "state" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def read(self) -> Optional[dict[str, Any]]:
        path = self.root / PROGRESS
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        return record if record and record.get("folder") else None

    def save(self, runner: FamilyRunner, progress: LoopProgress, name: Optional[str] = None) -> None:
        path = self.root / PROGRESS
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        folder = self.root / (name or f"c-{progress.chunks_done:06d}")
        if folder.exists():
            if folder.name != record.get("pending"):
                raise FileExistsError(f"{folder} exists but the sweep has no record of writing it; move it away")
            shutil.rmtree(folder)  # what a save killed before it finished left
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**record, "pending": folder.name})
        folder.mkdir()
        runner.save_state(folder)
        write_json_atomic(path, {"folder": folder.name, "loop": progress.to_dict(), "pending": None})
        previous = record.get("folder")
        if previous and previous != folder.name and (self.root / previous).is_dir():
            shutil.rmtree(self.root / previous)


def _base_row(cfg: SweepConfig, cell: Cell, total: int, chunk: int) -> dict[str, Any]:
    return {"cell": cell.key(cfg.protocol), "method": cell.method, "model": cfg.model, "dataset": cfg.dataset,
            "protocol": cfg.protocol, "n_edits": cell.n_edits, "num_seq": cell.num_seq,
            "batch_size": cell.batch_size, "seed": cell.seed, "total": total, "chunk": chunk}


def _metrics(scores: dict[str, Any], locate: bool) -> dict[str, Any]:
    out = {k: scores[k] for k in METRICS}
    if locate:
        out["average"] = sum(scores[k] for k in AVERAGED_METRICS) / len(AVERAGED_METRICS)
    return out


def _training(cfg: SweepConfig, split: Split, records: dict[str, EditRecord], total: int, chunk: int, chunks: int,
              retrain: bool, val_fraction: float) -> tuple[Training, list[str]]:
    """The cell's training records and the shape it trains for (the protocol's chunk, or ``train_batch``).

    All of the training pool, or, when its edits accumulate over several chunks, as many as it edits (RLEdit's
    protocol: a training trajectory as long as the edited sequence) plus the validation share on top.
    """
    declared = cfg.declared
    sequential = declared.accumulate and chunks > 1
    n = cfg.train_records or (math.ceil(total / (1.0 - val_fraction)) if sequential else len(split.train_pool))
    if n > len(split.train_pool):
        raise ValueError(f"the cell trains on {n} records, but only {len(split.train_pool)} training records are left "
                         "after the edit targets were held out; lower --train-records or the edit counts")
    ids = split.train_pool[:n]
    shape = (cfg.train_batch or chunk, chunks if declared.accumulate else 1)
    return Training([records[i] for i in ids], data_key(cfg, ids), cfg.out / "archives", cfg.protocol,
                    retrain=retrain, shape=shape), ids


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    cfg, cell, split = load_config(job["config"]), Cell(**job["cell"]), Split(**job["split"])
    ccfg = cfg.compare_config(cell)
    declared = ccfg.declared
    total, chunk = ccfg.sizes
    records, _, _ = records_by_id(cfg)
    entry = MethodEntry.parse(cell.method)
    cls = runner_class(entry)
    if job["phase"] == "prepare" and not cls.trains:
        return {}
    model, tok = load_model(ccfg)
    runner = cls(Bench(model, tok, cfg.model, cfg.dataset, cfg.progress, cfg.easyedit_hparams),
                 method_choice(ccfg, entry))
    choice = runner.choice
    training, train_ids = (_training(cfg, split, records, total, chunk, ccfg.chunks,
                                     job["phase"] == "prepare" and cfg.retrain, choice.train_hparams.val_fraction)
                           if cls.trains else (None, []))
    if job["phase"] == "prepare":
        prepared = runner.prepare(training)
        return {"train_s_per_edit": prepared.get("train_s_per_edit"), "archive": prepared.get("archive"),
                "trained_now": prepared.get("trained_now"),
                "train_peak_rss_mb": peak_rss_mb() if prepared.get("trained_now") else None}
    runner.prepare(training)  # reuses what the prepare phase trained
    edit_ids = split.edit_ids(total, cell.seed)
    evaluation = [records[i] for i in edit_ids]
    scored = (sorted(random.Random(cell.seed).sample(range(total), cfg.score_sample))
              if cfg.score_sample and total > cfg.score_sample else list(range(total)))
    reference: Optional[list] = None
    if declared.agreement_locality:
        predicted = predict_locality_reference(model, tok, [evaluation[i] for i in scored], progress=cfg.progress)
        reference = [None] * total
        for i, ref in zip(scored, predicted):
            reference[i] = ref
    unedited = score(model, tok, [evaluation[i] for i in scored], declared, cfg.dataset,
                     None if reference is None else [reference[i] for i in scored], cfg.progress)
    base = _base_row(cfg, cell, total, chunk)
    locate = declared.scoring == "locate"
    state = CellState(cfg.out, base["cell"])
    resume = None
    saved = state.read() if runner.resumable else None
    if saved is not None:
        runner.load_state(state.root / saved["folder"])
        resume = LoopProgress(**saved["loop"])
    marks = set(ccfg.checkpoints)

    def after_chunk(progress: LoopProgress) -> None:
        point = progress.curve[-1] if progress.curve else None
        at_mark = False
        if point is not None and point["num_seq"] == progress.chunks_done:
            append_row(cfg.out, {**base, "point": point["n_edited"], **_metrics(point, locate)})
            at_mark = point["n_edited"] in marks
        due = at_mark or bool(cfg.state_every and progress.chunks_done % cfg.state_every == 0)
        if runner.resumable and due and progress.chunks_done < ccfg.chunks:
            state.save(runner, progress)

    start = time.perf_counter()
    result = run_protocol(runner, declared, evaluation, chunk=chunk, dataset=cfg.dataset, reference=reference,
                          curve_every=cfg.curve_every, checkpoints=ccfg.checkpoints, score_on=scored,
                          after_chunk=after_chunk, resume=resume, progress=cfg.progress, label=cell.method,
                          keep_edits=True)
    seconds = time.perf_counter() - start
    if runner.resumable:
        state.save(runner, result.progress, name="final")
    prepared = job["prepared"]
    train_hp = getattr(runner, "train_hparams", None)
    return {**base, "point": None, **_metrics(result.metrics, locate), "unedited": _metrics(unedited, locate),
            "curve": result.curve, "scoring": unedited["scoring"], "score_sample": len(scored),
            "scored_ids": [edit_ids[i] for i in scored] if len(scored) < total else "all",
            "edit_ids": edit_ids, "train_records": len(train_ids), "train_ids": train_ids,
            "archive": prepared.get("archive"), "train_s_per_edit": prepared.get("train_s_per_edit"),
            "train_peak_rss_mb": prepared.get("train_peak_rss_mb"), "trained_now": prepared.get("trained_now"),
            "edit_s_per_edit": result.edit_seconds / total, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "chunk_seconds": result.progress.chunk_seconds, "chunk_peak_mb": result.progress.chunk_peak_mb,
            "settings": {"edit": _settings(runner.hparams), "train": _settings(train_hp)}, **runner.report()}


def _settings(hparams: Any) -> Optional[dict[str, Any]]:
    if hparams is None:
        return None
    data = hparams.to_dict() if hasattr(hparams, "to_dict") else vars(hparams)
    return json.loads(json.dumps(data, default=str))


def main(argv: Sequence[str]) -> int:
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_cell(job)
    write_json_atomic(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
