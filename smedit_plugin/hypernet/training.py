"""Training hypernetwork archives: train or resume one, or reuse the archive of the same settings (one cache key).

``smedit train`` and the family runner (:mod:`.runner`) come through here. Validation during training edits
with the live editor through the one edit loop (:class:`EditorRunner`); the weight update itself is always
:func:`~smedit_plugin.hypernet.editor.edit_batch`, the same call EasyEdit's apply function makes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..edit_loop import run_protocol
from ..editing import WeightsSnapshot
from ..families import Bench, FamilyRunner, MethodChoice
from ..fileio import MANIFEST, is_versioned_dir, leftovers, read_manifest, remove_leftovers
from ..protocols import PROTOCOLS
from ..records import EditRecord
from ..distributed import SINGLE, RowReduce
from .archive import FORMAT, ArchiveError, load_archive, read_meta, save_archive
from .editor import HypernetEditor, edit_batch, hypernet_device
from .hparams import HypernetHyperParams
from .trainer import MetaTrainer, TrainState


@dataclasses.dataclass
class TrainResult:
    archive: Path
    state: TrainState
    train_seconds: float
    edits_seen: int

    @property
    def seconds_per_edit(self) -> float:
        return self.train_seconds / max(self.edits_seen, 1)


class EditorRunner(FamilyRunner):
    """A runner over a live editor (no archive yet): training validation and benchmarks edit through
    :func:`~.editor.edit_batch` itself, under the same loop as every family."""

    def __init__(self, bench: Bench, editor: HypernetEditor) -> None:
        super().__init__(bench, MethodChoice(editor.hparams.alg_name, editor.hparams.alg_name, editor.hparams))
        self.editor = editor

    def capture(self, snapshot: WeightsSnapshot) -> None:
        for name in self.editor.module_names:
            snapshot.capture_module(name)

    def edit(self, records: Sequence[EditRecord]) -> float:
        self._capture_once()
        start = time.perf_counter()
        edit_batch(self.bench.model, self.bench.tok, self.editor, [r.prompt for r in records],
                   [r.target_new for r in records], self.snapshot)
        return time.perf_counter() - start


def edit_and_score(model: nn.Module, tok, editor: HypernetEditor, records: Sequence[EditRecord], *, n_edits: int,
                   dataset: str = "zsre", progress: bool = False) -> dict[str, Any]:
    """``records`` edited in accumulating chunks of ``n_edits`` with a live editor and scored (the sequential
    protocol's loop, :func:`~smedit_plugin.edit_loop.run_protocol`); the model is restored afterwards."""
    result = run_protocol(EditorRunner(Bench(model, tok, "", dataset, progress), editor), PROTOCOLS["sequential"],
                          records, chunk=n_edits, dataset=dataset, progress=progress)
    return {**result.metrics, "edit_seconds": result.edit_seconds}


def split_validation(records: Sequence[EditRecord], fraction: float, seed: int) -> tuple[list[EditRecord], list[EditRecord]]:
    """``(train, validation)``: a seeded random ``fraction`` of ``records`` held out, the rest kept in order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    held = set(random.Random(seed).sample(range(len(records)), max(1, round(fraction * len(records)))))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def check_out_dir(out: Union[str, os.PathLike], hparams: HypernetHyperParams, model_name: str, *,
                  overwrite: bool = False) -> bool:
    """Whether ``out`` holds an archive of this run to resume; refuses anything else that is there.

    ``out`` may be missing, an empty folder, or an archive of the same method and model (possibly
    with what an interrupted save left beside it). Any other file or folder content, and a damaged
    archive, raise unless ``overwrite`` (then it is replaced when training starts). Cheap: called by
    ``smedit train`` before the model is loaded.
    """
    path = Path(out)
    if not path.exists():
        return False
    if not path.is_dir():
        if overwrite:
            return False
        raise FileExistsError(f"--out {path} is an existing file; give a folder for the archive, or pass --overwrite "
                              "to replace the file")
    ours = {MANIFEST, _published(path)} | {p.name for p in leftovers(path)}
    foreign = [p.name for p in path.iterdir() if p.name not in ours]
    if not is_versioned_dir(path):
        if foreign and not overwrite:
            raise FileExistsError(f"--out {path} is a non-empty folder that is not an archive ({', '.join(sorted(foreign)[:5])}"
                                  f"{' ...' if len(foreign) > 5 else ''}); give an empty or new folder, or pass "
                                  "--overwrite to delete its contents")
        return False
    try:
        meta = read_meta(path)
    except ArchiveError as exc:
        if overwrite:
            return False
        raise ArchiveError(f"--out {path}: {exc}; pass --overwrite to replace it") from exc
    if (meta["alg_name"], meta["model_name"]) != (hparams.alg_name, model_name) or foreign:
        if overwrite:
            return False
        raise FileExistsError(
            f"--out {path} holds an archive of {meta['alg_name']} on {meta['model_name']!r}"
            + (f" and other files ({', '.join(sorted(foreign)[:5])})" if foreign else "")
            + f", not of this run ({hparams.alg_name} on {model_name!r}); give another folder or pass --overwrite")
    return bool(meta.get("train_state"))


def _published(path: Path) -> Optional[str]:
    """The version folder the archive's manifest names (None without a readable one)."""
    try:
        manifest = read_manifest(path, FORMAT, ArchiveError)
    except ArchiveError:
        return None
    return manifest["version"] if manifest else None


def _clear(path: Path) -> None:
    """Remove what ``--overwrite`` replaces: a file, or every entry of a folder except a published archive version
    (replaced by the first save of the new run, so the folder never goes without one)."""
    keep = {MANIFEST, _published(path)} if path.is_dir() and is_versioned_dir(path) else set()
    entries = [e for e in path.iterdir() if e.name not in keep] if path.is_dir() else [path] if path.exists() else []
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def train_hypernet(model: nn.Module, tok, hparams: HypernetHyperParams, train_records: Sequence[EditRecord],
                   out_dir: Union[str, os.PathLike], *, val_records: Optional[Sequence[EditRecord]] = None,
                   model_name: Optional[str] = None, resume: bool = True, progress: bool = True,
                   dataset: str = "zsre", overwrite: bool = False, reduce: RowReduce = SINGLE) -> TrainResult:
    """Train (or resume training of) the method's hypernetworks and write the archive to ``out_dir``.

    Under a data-parallel launcher (``reduce`` from :func:`~.distributed.init_from_environment`) every rank
    runs this with the same arguments; each batch is shared among the ranks and only rank 0 writes.

    Validation records (``val_records``, else a ``val_fraction`` of ``train_records``) are scored after
    every epoch; the archive then holds the networks with the lowest validation loss. ``out_dir`` is
    checked by :func:`check_out_dir` first (``overwrite`` replaces what is not an archive of this run).
    A resumed run removes what an interrupted save left and continues from the last published version.
    """
    out = Path(out_dir)
    if val_records is None and hparams.val_fraction > 0:
        train_records, val_records = split_validation(train_records, hparams.val_fraction, hparams.seed)
    name = model_name or (hparams.model_name if isinstance(hparams.model_name, str) else "in-memory-model")
    resumable = check_out_dir(out, hparams, name, overwrite=overwrite)
    reduce.barrier()  # every rank has looked at --out before the first one changes it
    if resume and resumable:
        if reduce.is_first:
            remove_leftovers(out)
        reduce.barrier()
        editor, _, opt, state = load_archive(out, model, hparams, with_optimizer=True, device=hypernet_device(hparams))
        trainer = MetaTrainer(model, tok, hparams, editor=editor, optimizer=opt, state=state, reduce=reduce)
    else:
        if overwrite and reduce.is_first:
            _clear(out)
        torch.manual_seed(hparams.seed)
        trainer = MetaTrainer(model, tok, hparams, reduce=reduce)

    def validate() -> dict[str, Any]:
        recs = list(val_records or [])
        scored = recs[: hparams.val_n_edits * hparams.num_seq]
        m = edit_and_score(model, tok, trainer.editor, scored, n_edits=hparams.val_n_edits, dataset=dataset)
        return {"loss": trainer.validation_loss(recs), **{k: m[k] for k in ("efficacy", "generalization", "specificity")}}

    def checkpoint(t: MetaTrainer) -> None:
        if reduce.is_first:
            save_archive(out, t.editor, model_name=name, optimizer=t.opt, state=t.state)

    seconds_before = trainer.state.seconds
    edits_before = trainer.state.edits_seen
    state = trainer.train(train_records, validate=validate if val_records else None, checkpoint=checkpoint,
                          progress=progress)
    result = TrainResult(out, state, state.seconds - seconds_before, state.edits_seen - edits_before)
    if reduce.is_first:
        save_archive(out, trainer.editor, model_name=name, optimizer=trainer.opt, state=state,
                     extra={"complete": True, "train_s_per_edit": result.seconds_per_edit})
    reduce.barrier()
    return result


@dataclasses.dataclass(frozen=True)
class TrainedArchive:
    """An archive ready to edit with, and what training it cost (None when an earlier run trained it)."""

    path: Path
    train_s_per_edit: Optional[float]
    trained: Optional[TrainResult] = None  # this call's training, None when the archive was reused

    @property
    def trained_now(self) -> bool:
        return self.trained is not None


def archive_fingerprint(train_hp: HypernetHyperParams, model_key: str, dataset: str,
                        train_data: Union[Path, str, None]) -> str:
    """The one cache key of a trained archive: method, model, dataset, every training field and the data (a file's
    bytes, or a string that names exactly which records)."""
    h = hashlib.sha256()
    for part in (FORMAT, train_hp.alg_name, model_key, dataset, train_hp.to_dict(), train_data):
        if isinstance(part, Path) and part.is_file():
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def archive_path(train_hp: HypernetHyperParams, *, train_data: Union[Path, str, None], model_key: str, dataset: str, root: Path,
                 label: str) -> Path:
    """Where :func:`train_or_reuse` keeps the archive of these settings; ``label`` only makes the name readable."""
    key = archive_fingerprint(train_hp, model_key, dataset, train_data)
    return root / f"{train_hp.alg_name}-{model_key}-{dataset}-{label}-{key}"


def ensure_trained(model: nn.Module, tok, train_hp: HypernetHyperParams, train_records: Sequence[EditRecord],
                   archive: Path, *, model_key: str, dataset: str, retrain: bool = False,
                   progress: bool = True, reduce: RowReduce = SINGLE) -> TrainedArchive:
    """``archive`` as it is when a completed training wrote it, else trained (or resumed, unless ``retrain``) now.

    Under a data-parallel launcher rank 0 decides whether the archive is complete, so all ranks either
    reuse it or train it together."""
    meta = read_meta(archive) if not retrain and is_versioned_dir(archive) else {}
    complete, seconds = reduce.decided_by_first((bool(meta.get("complete")), meta.get("train_s_per_edit")))
    if complete:
        return TrainedArchive(archive, seconds)
    result = train_hypernet(model, tok, train_hp, train_records, archive, model_name=model_key, dataset=dataset,
                            progress=progress, resume=not retrain, overwrite=retrain, reduce=reduce)
    return TrainedArchive(archive, result.seconds_per_edit, result)


def train_or_reuse(model: nn.Module, tok, train_hp: HypernetHyperParams, train_records: Sequence[EditRecord], *,
                   train_data: Union[Path, str, None], model_key: str, dataset: str, root: Path, label: str,
                   retrain: bool = False, progress: bool = True, reduce: RowReduce = SINGLE) -> TrainedArchive:
    """The cached archive of these training settings under ``root`` (:func:`archive_fingerprint` is the one key)."""
    archive = archive_path(train_hp, train_data=train_data, model_key=model_key, dataset=dataset, root=root,
                           label=label)
    return ensure_trained(model, tok, train_hp, train_records, archive, model_key=model_key, dataset=dataset,
                          retrain=retrain, progress=progress, reduce=reduce)
