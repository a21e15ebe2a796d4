"""Training hypernetwork archives: train or resume one, or reuse the archive of the same settings (one cache key).

``smedit train`` and the family runner (:mod:`.runner`) come through here. Validation during training edits
with the live editor through the one edit loop (:class:`EditorRunner`); the weight update itself is always
:func:`~smedit_plugin.hypernet.editor.edit_batch`, the same call EasyEdit's apply function makes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..distributed import SINGLE, RowReduce
from ..edit_loop import run_protocol
from ..editing import WeightsSnapshot
from ..errors import SettingsMismatchError, short_repr
from ..families import Bench, FamilyRunner, MethodChoice
from ..fileio import folder_lock, foreign_message, inspect_folder, is_versioned_dir
from ..protocols import PROTOCOLS
from ..records import EditRecord
from .archive import FORMAT, ArchiveError, load_archive, read_meta, save_archive
from .editor import HypernetEditor, edit_batch, hypernet_device, identity_probe
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


#: hparams fields a resumed run may change without changing what the archive learns: devices, chunking, how long
#: to train and how to validate. Every other field (and the data, the seed, the model) must match to resume.
RESUMABLE_FIELDS = frozenset({"archive", "device", "hypernet_device", "model_parallel", "chunk_size", "micro_batch_size",
                              "cache_memory_mb", "spill_dir",
                              "reuse_frozen_prefix", "max_steps", "n_epochs", "val_interval", "val_n_edits",
                              "early_stop_patience", "batch_size", "max_length"})
#: Fields that only say where batch-sized state is kept (memory or spill files): never part of an archive's cache
#: key, so archives cached before they existed keep their key.
STORAGE_FIELDS = frozenset({"cache_memory_mb", "spill_dir"})
#: Fields each data-parallel rank sets for itself (its own device).
PER_RANK_FIELDS = frozenset({"device", "hypernet_device"})


def records_sha256(records: Optional[Sequence[EditRecord]]) -> Optional[str]:
    """sha256 of the records' content in order (None for no records): the data part of a training fingerprint."""
    if records is None:
        return None
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(dataclasses.asdict(record), sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def training_fingerprint(hparams: HypernetHyperParams, model_name: str, train_records: Sequence[EditRecord],
                         val_records: Optional[Sequence[EditRecord]] = None) -> dict[str, Any]:
    """What shapes a training run: every hparams field but the per-rank device ones, the model's name and the data.

    Recorded in the archive (``meta["training_fingerprint"]``); a resume compares it except for
    :data:`RESUMABLE_FIELDS`, data-parallel ranks compare all of it. (The cache key of
    :func:`archive_fingerprint` is another thing: the hash that names a cached archive's folder.)
    """
    fields = {k: v for k, v in hparams.to_dict().items() if k not in PER_RANK_FIELDS}
    fields.update(model_name=model_name, data_sha256=records_sha256(train_records),
                  val_data_sha256=records_sha256(val_records))
    return json.loads(json.dumps(fields, default=str))  # as stored: tuples become lists


def resume_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: archive X, now Y`` for every field the archive records that may not change across a resume and did.

    Fields the archive does not record (the data hash, in an archive of an earlier smedit-plugin) are not compared.
    """
    keys = sorted(set(recorded) - RESUMABLE_FIELDS)
    return [f"{k}: archive {short_repr(recorded.get(k))}, now {short_repr(current.get(k))}" for k in keys
            if recorded.get(k) != current.get(k)]


def _recorded_fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """The archive's training fingerprint; for an archive of an earlier version, its hparams (no data hash)."""
    recorded = meta.get("training_fingerprint")
    if isinstance(recorded, dict):
        return recorded
    hp = {k: v for k, v in meta.get("hparams", {}).items() if k not in PER_RANK_FIELDS}
    return {**hp, "model_name": meta.get("model_name")}


def check_out_dir(out: Union[str, os.PathLike], hparams: HypernetHyperParams, model_name: str, *,
                  overwrite: bool = False, fingerprint: Optional[dict[str, Any]] = None,
                  continue_with_new_settings: bool = False) -> bool:
    """Whether ``out`` holds an archive of this run to resume; refuses anything else that is there.

    ``out`` may be missing, an empty folder, or an archive of the same method and model (with what an
    interrupted save recorded beside it). Refused: an existing file; a damaged archive (the message says
    how to get the intact version back; nothing is deleted); a COMEBA-HK state or a damaged version; entries the
    plugin did not write, and another run's archive, unless ``overwrite`` (the archive is then written
    beside those entries, which are never deleted, and replaces the other run's archive); with
    ``fingerprint``, an archive of this method and model trained with other settings
    (:func:`resume_differences`) unless ``continue_with_new_settings``. Cheap: ``smedit train`` calls it
    before the model is loaded.
    """
    path = Path(out)
    try:
        contents = inspect_folder(path, FORMAT, ArchiveError)
    except ArchiveError as exc:
        raise ArchiveError(f"--out {exc}") from exc
    except FileExistsError as exc:
        raise FileExistsError(f"--out {exc}") from exc
    if contents.foreign and not overwrite:
        raise FileExistsError("--out " + foreign_message(path, contents.foreign, "--overwrite"))
    if contents.manifest is None:
        return False
    try:
        meta = read_meta(path)
    except ArchiveError as exc:
        raise ArchiveError(f"--out {path}: {exc}; give another folder (nothing was changed)") from exc
    if (meta["alg_name"], meta["model_name"]) != (hparams.alg_name, model_name):
        if overwrite:
            return False
        raise FileExistsError(f"--out {path} holds an archive of {meta['alg_name']} on {meta['model_name']!r}, not of this "
                              f"run ({hparams.alg_name} on {model_name!r}); give another folder or pass --overwrite to "
                              "replace it")
    if not meta.get("train_state"):
        return False
    if fingerprint is not None and not continue_with_new_settings:
        differences = resume_differences(_recorded_fingerprint(meta), fingerprint)
        if differences:
            raise SettingsMismatchError(
                f"--out {path} holds an archive trained with other settings; resuming would silently mix them:\n  - "
                + "\n  - ".join(differences) + "\nPass --continue-with-new-settings to continue it anyway (the archive "
                "then records both), --no-resume to train it again from scratch, or give another --out")
    return True


def train_hypernet(model: nn.Module, tok, hparams: HypernetHyperParams, train_records: Sequence[EditRecord],
                   out_dir: Union[str, os.PathLike], *, val_records: Optional[Sequence[EditRecord]] = None,
                   model_name: Optional[str] = None, resume: bool = True, progress: bool = True,
                   dataset: str = "zsre", overwrite: bool = False, continue_with_new_settings: bool = False,
                   reduce: RowReduce = SINGLE) -> TrainResult:
    """Train (or resume training of) the method's hypernetworks and write the archive to ``out_dir``.

    Under a data-parallel launcher (``reduce`` from :func:`~.distributed.init_from_environment`) every rank
    runs this with the same arguments: the ranks first compare their :func:`training_fingerprint` and
    model identity (any difference fails every rank, rank 0 naming the rank and field, before a
    collective whose size depends on them); each batch is then shared among the ranks and only rank 0
    writes, holding ``out_dir``'s writer lock for the whole run.

    Validation records (``val_records``, else a ``val_fraction`` of ``train_records``) are scored after
    every epoch; the archive then holds the networks with the lowest validation loss. ``out_dir`` is
    checked by :func:`check_out_dir` first. Resuming an archive trained with other settings is refused
    unless ``continue_with_new_settings`` (then the archive records the earlier fingerprint too).
    """
    out = Path(out_dir)
    name = model_name or (hparams.model_name if isinstance(hparams.model_name, str) else "in-memory-model")
    fingerprint = training_fingerprint(hparams, name, train_records, val_records)
    reduce.check_same({**fingerprint, "model_identity": identity_probe(model, hparams.edit_modules)},
                      "hparams, data and model")
    check_out_dir(out, hparams, name, overwrite=overwrite)  # refuse before the lock file is made in a folder not ours
    with folder_lock(out) if reduce.is_first else contextlib.nullcontext():
        return _train_locked(model, tok, hparams, train_records, out, val_records=val_records, name=name,
                             fingerprint=fingerprint, resume=resume, progress=progress, dataset=dataset,
                             overwrite=overwrite, continue_with_new_settings=continue_with_new_settings, reduce=reduce)


def _train_locked(model: nn.Module, tok, hparams: HypernetHyperParams, train_records: Sequence[EditRecord], out: Path,
                  *, val_records: Optional[Sequence[EditRecord]], name: str, fingerprint: dict[str, Any], resume: bool,
                  progress: bool, dataset: str, overwrite: bool, continue_with_new_settings: bool,
                  reduce: RowReduce) -> TrainResult:
    """:func:`train_hypernet` once the ranks agree and rank 0 holds the folder's lock."""
    if val_records is None and hparams.val_fraction > 0:
        train_records, val_records = split_validation(train_records, hparams.val_fraction, hparams.seed)
    resumable = check_out_dir(out, hparams, name, overwrite=overwrite, fingerprint=fingerprint if resume else None,
                              continue_with_new_settings=continue_with_new_settings)
    reduce.barrier()  # every rank has looked at --out before the first one changes it
    record: dict[str, Any] = {"training_fingerprint": fingerprint, "fingerprint_history": []}
    if resume and resumable:
        editor, meta, opt, state = load_archive(out, model, hparams, with_optimizer=True, device=hypernet_device(hparams))
        history = [h for h in meta.get("fingerprint_history", []) if isinstance(h, dict)]
        earlier = _recorded_fingerprint(meta)
        differences = resume_differences(earlier, fingerprint)
        if differences:  # only with continue_with_new_settings: check_out_dir refused otherwise
            warnings.warn(f"{out}: continuing an archive trained with other settings ({'; '.join(differences)}); "
                          "the archive records both", stacklevel=3)
            history.append({"training_fingerprint": earlier, "units_done": state.units_done,
                            "differences": differences})
        record["fingerprint_history"] = history
        trainer = MetaTrainer(model, tok, hparams, editor=editor, optimizer=opt, state=state, reduce=reduce)
    else:
        torch.manual_seed(hparams.seed)
        trainer = MetaTrainer(model, tok, hparams, reduce=reduce)

    def validate() -> dict[str, Any]:
        recs = list(val_records or [])
        scored = recs[: hparams.val_n_edits * hparams.num_seq]
        m = edit_and_score(model, tok, trainer.editor, scored, n_edits=hparams.val_n_edits, dataset=dataset)
        return {"loss": trainer.validation_loss(recs), **{k: m[k] for k in ("efficacy", "generalization", "specificity")}}

    def checkpoint(t: MetaTrainer) -> None:
        if reduce.is_first:
            save_archive(out, t.editor, model_name=name, optimizer=t.opt, state=t.state, extra=record,
                         overwrite=overwrite)

    seconds_before = trainer.state.seconds
    edits_before = trainer.state.edits_seen
    state = trainer.train(train_records, validate=validate if val_records else None, checkpoint=checkpoint,
                          progress=progress)
    result = TrainResult(out, state, state.seconds - seconds_before, state.edits_seen - edits_before)
    if resumable and resume and result.edits_seen == 0 and reduce.is_first:
        warnings.warn(f"{out}: the archive already holds {state.units_done} training units, so this run trained "
                      "nothing; raise max_steps or n_epochs to train further", stacklevel=3)
    if reduce.is_first:
        save_archive(out, trainer.editor, model_name=name, optimizer=trainer.opt, state=state, overwrite=overwrite,
                     extra={**record, "complete": True, "train_s_per_edit": result.seconds_per_edit})
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
    fields = {k: v for k, v in train_hp.to_dict().items() if k not in STORAGE_FIELDS}
    for part in (FORMAT, train_hp.alg_name, model_key, dataset, fields, train_data):
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
    reuse it or train it together. Rank 0 holds the archive's lock meanwhile: a second process needing the
    same archive waits (up to ``SMEDIT_LOCK_TIMEOUT``) and then reuses what the first one trained."""
    with folder_lock(archive) if reduce.is_first else contextlib.nullcontext():  # a concurrent run trains it first
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
