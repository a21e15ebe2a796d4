"""``smedit sweep``: a grid of methods x edit counts x seeds, each cell in its own process, every row kept at once.

The sweep fixes one split for all its cells (``split_seed``): the edit targets come from the evaluation
file and, when it is too small for the largest cell, from records held out of the training file; methods
that train use only what is left. Each cell edits the first ``total`` targets of a permutation seeded by
the cell's seed (so smaller cells are nested in larger ones) and is scored on all of them or on a seeded
sample (``score_sample``); edits are always applied to the whole batch. A cell runs in a fresh process
(its peak memory is its own): first the training of its method if it trains (archives are reused across
cells whose training settings and records match), then the edits. Finished cells are appended to
``rows.jsonl`` at once and never run again; a cell whose runner can save its edits (COMEBA-HK, MEMIT-C,
the hypernetwork methods) saves them every ``state_every`` chunks and at each checkpoint, so a killed
sweep continues inside that cell (``--resume``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from ..fileio import sha256_of, write_json_atomic
from ..protocols import Protocol, protocol
from ..records import EditRecord, load_records
from .config import CompareConfig, check_config

ROWS = "rows.jsonl"
SPLIT = "split.json"
#: Row fields that measure the machine rather than the edits (they differ between two runs of the same cell).
MACHINE_FIELDS = ("train_s_per_edit", "edit_s_per_edit", "peak_rss_mb", "train_peak_rss_mb", "seconds",
                  "trained_now", "chunk_seconds", "chunk_peak_mb")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A grid: every method x every combination of the size lists x every seed, under one protocol."""

    model: str
    dataset: str
    train_data: Optional[Path]
    eval_data: Path
    methods: tuple[str, ...]
    out: Path
    protocol: str = "batch"
    n_edits: tuple[int, ...] = (64,)
    num_seq: tuple[int, ...] = (1,)
    batch_size: tuple[int, ...] = (10,)
    seeds: tuple[int, ...] = (0,)
    checkpoints: tuple[int, ...] = ()
    curve_every: int = 0
    score_sample: int = 0
    split_seed: int = 0
    train_records: Optional[int] = None
    train_batch: Optional[int] = None
    edit_pool: Optional[int] = None
    state_every: int = 0
    retrain: bool = False
    resume: bool = False
    progress: bool = True
    easyedit_hparams: Optional[Path] = None

    @property
    def declared(self) -> Protocol:
        return protocol(self.protocol)

    def cells(self) -> list["Cell"]:
        """Every cell, methods outermost (one method's archive serves its cells in a row), sizes, then seeds."""
        return [Cell(m, n, s, b, seed) for m in self.methods for n in self.n_edits for s in self.num_seq
                for b in self.batch_size for seed in self.seeds]

    def compare_config(self, cell: "Cell") -> CompareConfig:
        """The one-cell ``smedit compare`` settings (checks, sizes and YAML choice are shared with it)."""
        return CompareConfig(model=self.model, dataset=self.dataset, train_data=self.train_data,
                             eval_data=self.eval_data, methods=[cell.method], protocol=self.protocol,
                             n_edits=cell.n_edits, num_seq=cell.num_seq, batch_size=cell.batch_size,
                             archive_root=self.out / "archives", retrain=self.retrain, curve_every=self.curve_every,
                             checkpoints=tuple(c for c in self.checkpoints if c <= self.total(cell)),
                             progress=self.progress, easyedit_hparams=self.easyedit_hparams)

    def total(self, cell: "Cell") -> int:
        return self.declared.sizes(cell.n_edits, cell.num_seq, cell.batch_size)[0]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    n_edits: int
    num_seq: int
    batch_size: int
    seed: int

    def key(self, protocol_name: str) -> str:
        """The cell's identity in the rows file."""
        return f"{self.method}|{protocol_name}|n{self.n_edits}|s{self.num_seq}|b{self.batch_size}|seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Split:
    """Record ids (``"<file stem>:<i>"``, the i-th usable record of that file) of the edit pool and the training
    pool; fixed by ``split_seed`` for the whole sweep and written to ``split.json``."""

    edit_pool: list[str]
    train_pool: list[str]
    seed: int

    @classmethod
    def make(cls, tags: tuple[str, str], n_eval: int, n_train: int, needed: int, seed: int) -> "Split":
        """The evaluation records first, then (only if needed) a seeded sample held out of the training records."""
        missing = max(0, needed - n_eval)
        if missing > n_train:
            raise ValueError(f"the largest cell edits {needed} facts, but the evaluation file has {n_eval} and the "
                             f"training file {n_train} records: give more records or smaller edit counts")
        held = sorted(random.Random(seed).sample(range(n_train), missing))
        held_set = set(held)
        eval_tag, train_tag = tags
        return cls([f"{eval_tag}:{i}" for i in range(n_eval)] + [f"{train_tag}:{i}" for i in held],
                   [f"{train_tag}:{i}" for i in range(n_train) if i not in held_set], seed)

    def edit_ids(self, total: int, seed: int) -> list[str]:
        """The cell's edit targets: the first ``total`` of the edit pool permuted with ``seed`` (nested by size)."""
        order = list(self.edit_pool)
        random.Random(seed).shuffle(order)
        return order[:total]


def check_sweep(cfg: SweepConfig) -> None:
    """Every bad setting and output target before any model loads: each cell's compare checks, the lists, ``out``."""
    for name in ("n_edits", "num_seq", "batch_size", "seeds"):
        values = getattr(cfg, name)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seeds" else 1)
                             for v in values):
            raise ValueError(f"--{name.replace('_', '-')} must be a comma list of integers >= "
                             f"{0 if name == 'seeds' else 1}, got {values!r}")
    for field, least in (("score_sample", 0), ("state_every", 0), ("split_seed", 0)):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"--{field.replace('_', '-')} must be an integer >= {least}, got {value!r}")
    for field in ("train_records", "train_batch", "edit_pool"):
        value = getattr(cfg, field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{field.replace('_', '-')} must be a positive integer, got {value!r}")
    for cell in cfg.cells():
        check_config(cfg.compare_config(cell))
    check_out(cfg)


def check_out(cfg: SweepConfig) -> None:
    """``out`` is a new or empty folder, or (with ``resume``) a sweep of these same settings."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file; give a folder for the sweep")
    if not out.is_dir() or not any(out.iterdir()):
        return
    settings = out / "sweep.json"
    if not settings.is_file():
        raise FileExistsError(f"--out {out} is a non-empty folder that holds no sweep; give an empty or new folder")
    if not cfg.resume:
        raise FileExistsError(f"--out {out} holds a sweep already; pass --resume to continue it (finished cells are "
                              "kept, the cell in progress continues from its last saved state)")
    saved = json.loads(settings.read_text(encoding="utf-8"))
    fixed = ("model", "dataset", "train_data", "eval_data", "protocol", "split_seed", "score_sample", "train_records",
             "train_batch", "curve_every", "edit_pool")
    differ = [f for f in fixed if saved.get(f) != cfg.to_dict()[f]]
    if differ:
        raise ValueError(f"--resume: {out} was swept with other {', '.join(differ)} "
                         f"({', '.join(f'{f}={saved.get(f)!r}' for f in differ)}); use the same settings or another "
                         "--out (other methods, sizes, seeds and checkpoints may be added)")


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Rows kept so far, the last of each (cell, point) pair (a point scored again after a resume replaces itself);
    a line a killed process left half-written is skipped."""
    path = Path(out) / ROWS
    if not path.is_file():
        return []
    rows: dict[tuple[str, Optional[int]], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[(row["cell"], row.get("point"))] = row
    return list(rows.values())


def append_row(out: Path, row: dict[str, Any]) -> None:
    """One row, appended and flushed to disk before the sweep moves on."""
    with open(Path(out) / ROWS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def file_tags(cfg: SweepConfig) -> tuple[str, str]:
    """The id prefixes of the evaluation and training files' records: their file names without ``.json``."""
    eval_tag = Path(cfg.eval_data).stem
    train_tag = Path(cfg.train_data).stem if cfg.train_data else "train"
    return eval_tag, train_tag if train_tag != eval_tag else f"{train_tag}-train"


def records_by_id(cfg: SweepConfig) -> tuple[dict[str, EditRecord], int, int]:
    """Every usable record of both files under its id, and how many each file holds."""
    evaluation = load_records(cfg.eval_data, cfg.dataset)
    train = load_records(cfg.train_data, cfg.dataset) if cfg.train_data else []
    eval_tag, train_tag = file_tags(cfg)
    table = {f"{eval_tag}:{i}": r for i, r in enumerate(evaluation)}
    table.update({f"{train_tag}:{i}": r for i, r in enumerate(train)})
    return table, len(evaluation), len(train)


def data_key(cfg: SweepConfig, ids: Sequence[str]) -> str:
    """What keys a cell's archive: the two files' hashes and exactly which of their records it trains on."""
    h = hashlib.sha256()
    for path in (cfg.eval_data, cfg.train_data):
        h.update((sha256_of(Path(path)) if path else "-").encode())
    h.update(json.dumps(list(ids)).encode())
    return "records:" + h.hexdigest()


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """One phase of one cell in a fresh process (``python -m smedit_plugin.compare.sweep_cell``); its JSON result."""
    with tempfile.TemporaryDirectory(prefix="smedit-sweep-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**job, "result": str(result_file)}, default=str), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "smedit_plugin.compare.sweep_cell", str(job_file)])
        if done.returncode != 0:
            raise RuntimeError(f"cell {job['cell']['method']} ({job['phase']}) failed with exit code {done.returncode}; "
                               "its error is above. Rerun with --resume to continue the sweep after fixing it")
        return json.loads(result_file.read_text(encoding="utf-8"))


def run_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Run every cell not finished yet; returns all the rows kept (final rows and checkpoint rows)."""
    check_sweep(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", cfg.to_dict())
    _, n_eval, n_train = records_by_id(cfg)
    cells = cfg.cells()
    largest = max(cfg.total(c) for c in cells)
    if cfg.edit_pool is not None and cfg.edit_pool < largest:
        raise ValueError(f"--edit-pool {cfg.edit_pool} is smaller than the largest cell ({largest} facts)")
    split = Split.make(file_tags(cfg), n_eval, n_train, cfg.edit_pool or largest, cfg.split_seed)
    if not (out / SPLIT).is_file():
        write_json_atomic(out / SPLIT, dataclasses.asdict(split))
    elif json.loads((out / SPLIT).read_text(encoding="utf-8")) != dataclasses.asdict(split):
        raise ValueError(f"{out / SPLIT} was made for other cells (a larger edit count needs more held-out records); "
                         "sweep the larger sizes into another --out, or give every sweep the same --edit-pool")
    finished = {r["cell"] for r in read_rows(out) if r.get("point") is None}
    todo = [c for c in cells if c.key(cfg.protocol) not in finished]
    for cell in tqdm(todo, desc="sweep cells", unit="cell", disable=not cfg.progress):
        job = {"config": cfg.to_dict(), "cell": dataclasses.asdict(cell), "split": dataclasses.asdict(split)}
        prepared = run_child({**job, "phase": "prepare"})
        row = run_child({**job, "phase": "edit", "prepared": prepared})
        append_row(out, row)
    return read_rows(out)
