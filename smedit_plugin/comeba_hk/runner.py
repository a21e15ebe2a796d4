"""The locate-then-edit family's runner (COMEBA-HK, MEMIT-C): nothing to prepare, each chunk one consecutive
step through ``apply_comeba_hk_to_model``, and the roll back to before the first one (hook layers removed)."""
from __future__ import annotations

from ..editing import WeightsSnapshot
from ..families import FamilyRunner
from .state import remove_hook_layers


class LocateRunner(FamilyRunner):
    """Chunks edited one consecutive step each, on top of each other, until :meth:`roll_back`."""

    def capture(self, snapshot: WeightsSnapshot) -> None:
        for name in self.hparams.rewrite_module_names():
            snapshot.capture_module(name)
        model = self.bench.model
        snapshot.on_restore(lambda: remove_hook_layers(model))
