"""Train / validate / edit-and-evaluate flows for the hypernetwork methods (used by the CLI and benchmarks)."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data import EditRecord
from ..evaluation import METRICS, evaluate_records
from .apply import apply_steps
from .archive import load_archive, read_meta, save_archive
from .editor import HypernetEditor, hypernet_device
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


def edit_and_evaluate(model: nn.Module, tok, editor: HypernetEditor, records: Sequence[EditRecord], *,
                      n_edits: int, dataset: str = "zsre", locality: str = "gold", curve_every: int = 0,
                      progress: bool = False, after_batch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Edit ``records`` in batches of ``n_edits`` that accumulate, score all of them on the final model, restore.

    ``len(records) / n_edits`` batches = the sequential-batch protocol; one batch = batch editing.
    ``curve_every=k`` also re-scores every fact edited so far after each k-th batch (``metrics["curve"]``).
    ``after_batch(batch_no)`` runs after each batch is applied, while the edits are in the model.
    """
    weights = {n: editor.edit_module(n).weight for n in editor.module_names}
    snapshot = {n: w.detach().clone() for n, w in weights.items()}
    reference = None
    if locality == "agreement":
        from ..evaluation import predict_locality_reference

        reference = predict_locality_reference(model, tok, records)
    curve: list[dict[str, Any]] = []
    edit_seconds = 0.0
    try:
        for batch_no, i in enumerate(range(0, len(records), n_edits), start=1):
            chunk = records[i:i + n_edits]
            start = time.perf_counter()
            apply_steps(model, tok, editor, [r.prompt for r in chunk], [r.target_new for r in chunk])
            edit_seconds += time.perf_counter() - start
            if after_batch is not None:
                after_batch(batch_no)
            if curve_every and batch_no % curve_every == 0 and i + n_edits < len(records):
                seen = list(records[:i + n_edits])
                m = evaluate_records(model, tok, seen, dataset=dataset, locality=locality, progress=False,
                                     reference=None if reference is None else reference[:len(seen)])
                curve.append({"num_seq": batch_no, **{k: m[k] for k in METRICS}})
        metrics = evaluate_records(model, tok, list(records), dataset=dataset, locality=locality, reference=reference,
                                   progress=progress)
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(snapshot[n])
    metrics["edit_seconds"] = edit_seconds
    if curve_every:
        metrics["curve"] = curve + [{"num_seq": -(-len(records) // n_edits), **{k: metrics[k] for k in METRICS}}]
    return metrics


def train_hypernet(model: nn.Module, tok, hparams: HypernetHyperParams, train_records: Sequence[EditRecord],
                   out_dir: Union[str, os.PathLike], *, val_records: Optional[Sequence[EditRecord]] = None,
                   model_name: Optional[str] = None, resume: bool = True, progress: bool = True,
                   dataset: str = "zsre") -> TrainResult:
    """Train (or resume training of) the method's hypernetworks and write the archive to ``out_dir``."""
    out = Path(out_dir)
    name = model_name or (hparams.model_name if isinstance(hparams.model_name, str) else "in-memory-model")
    if resume and (out / "meta.json").is_file() and read_meta(out).get("train_state"):
        editor, _, opt, state = load_archive(out, model, hparams, with_optimizer=True, device=hypernet_device(hparams))
        trainer = MetaTrainer(model, tok, hparams, editor=editor, optimizer=opt, state=state)
    else:
        torch.manual_seed(hparams.seed)
        trainer = MetaTrainer(model, tok, hparams)

    def validate() -> dict[str, Any]:
        recs = list(val_records or [])[: hparams.val_n_edits * hparams.num_seq]
        if not recs:
            return {}
        m = edit_and_evaluate(model, tok, trainer.editor, recs, n_edits=hparams.val_n_edits, dataset=dataset)
        return {k: m[k] for k in ("efficacy", "generalization", "specificity")}

    def checkpoint(t: MetaTrainer) -> None:
        save_archive(out, t.editor, model_name=name, optimizer=t.opt, state=t.state)

    seconds_before = trainer.state.seconds
    edits_before = trainer.state.edits_seen
    state = trainer.train(train_records, validate=validate if val_records else None, checkpoint=checkpoint,
                          progress=progress)
    if val_records:
        state.history.append({"unit": state.units_done, "final_val": validate()})
    save_archive(out, trainer.editor, model_name=name, optimizer=trainer.opt, state=state)
    return TrainResult(out, state, state.seconds - seconds_before, state.edits_seen - edits_before)
