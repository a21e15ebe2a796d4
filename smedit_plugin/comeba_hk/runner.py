"""The locate-then-edit family's runner (COMEBA-HK, MEMIT-C): nothing to prepare, each chunk one consecutive
step through ``apply_comeba_hk_to_model``, and the roll back to before the first one (hook layers removed)."""
from __future__ import annotations

from pathlib import Path

from ..editing import WeightsSnapshot
from ..families import FamilyRunner
from .state import load_hook_state, remove_hook_layers, save_hook_state


class LocateRunner(FamilyRunner):
    """Chunks edited one consecutive step each, on top of each other, until :meth:`roll_back`.

    Resumable: the hook state (hook weights, accumulated covariance, alpha, step counter; MEMIT-C's edited
    weights) is the whole of what the edits changed, saved and loaded as a versioned state folder."""

    resumable = True

    def capture(self, snapshot: WeightsSnapshot) -> None:
        for name in self.hparams.rewrite_module_names():
            snapshot.capture_module(name)
        model = self.bench.model
        snapshot.on_restore(lambda: remove_hook_layers(model))

    def save_state(self, folder: Path) -> None:
        save_hook_state(self.bench.model, folder)

    def load_state(self, folder: Path) -> None:
        self._capture_once()
        load_hook_state(self.bench.model, folder)
