"""The hypernetwork family's runner: train (or reuse) the method's archive, edit through its apply function,
roll the edit modules back."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ..editing import WeightsSnapshot
from ..families import FamilyRunner, Training
from ..fileio import save_safetensors_atomic
from ..distributed import SINGLE
from .training import TrainedArchive, train_or_reuse


#: The saved edit-module weights of a run in progress (:meth:`HypernetRunner.save_state`).
STATE_FILE = "edit_modules.safetensors"


class HypernetRunner(FamilyRunner):
    """SMEdit, MALMEN2/1, RLEdit2/1: ``prepare`` trains the archive of ``choice.train_hparams`` on the training
    records (or reuses the one these exact settings trained before; one cache key, :func:`.training.archive_path`)
    and points the editing hparams at it; every chunk then goes through ``apply_<method>_to_model``."""

    trains = True
    resumable = True

    def prepare(self, training: Optional[Training] = None) -> dict[str, Any]:
        if training is None:
            raise ValueError(f"{self.choice.label} trains a hypernetwork first: give training records (--train-data)")
        bench, train_hp = self.bench, self.choice.train_hparams
        if training.shape is not None:  # train for the shape it will edit in (RLEdit's protocol); one budget for all
            chunk, chunks = training.shape
            train_hp = train_hp.replace(n_edits=chunk, num_seq=chunks, val_n_edits=chunk, max_steps=-1)
        self.train_hparams = train_hp
        reduce = training.reduce or SINGLE
        self.trained: TrainedArchive = train_or_reuse(
            bench.model, bench.tok, train_hp, training.records, train_data=training.data_key, model_key=bench.model_key,
            dataset=bench.dataset, root=training.archive_root, label=training.label, retrain=training.retrain,
            progress=bench.progress and reduce.is_first, reduce=reduce)
        self.hparams = self.hparams.replace(archive=str(self.trained.path))
        return {"train_s_per_edit": self.trained.train_s_per_edit, "archive": str(self.trained.path),
                "trained_now": self.trained.trained_now}

    def capture(self, snapshot: WeightsSnapshot) -> None:
        for name in self.hparams.edit_modules:
            snapshot.capture_module(name)

    def _edit_weights(self) -> dict[str, torch.nn.Parameter]:
        model = self.bench.model
        return {name: model.get_submodule(name).weight for name in self.hparams.edit_modules}

    def save_state(self, folder: Path) -> None:
        """The edit modules' weights as they are now: all the edits of this runner changed."""
        save_safetensors_atomic(self._edit_weights(), Path(folder) / STATE_FILE)

    @torch.no_grad()
    def load_state(self, folder: Path) -> None:
        self._capture_once()
        saved = load_file(str(Path(folder) / STATE_FILE))
        weights = self._edit_weights()
        if set(saved) != set(weights) or any(saved[n].shape != w.shape for n, w in weights.items()):
            raise ValueError(f"{folder / STATE_FILE} holds other modules or shapes than {self.choice.label}'s edit modules")
        for name, weight in weights.items():
            weight.copy_(saved[name].to(device=weight.device, dtype=weight.dtype))
