"""The COMEBA-HK / MEMIT-C runner: consecutive edits on a model and the roll back to before the first one.

``smedit compare``, the demo and the examples come through here; each edit is the EasyEdit apply
function itself (:func:`~smedit_plugin.comeba_hk.main.apply_comeba_hk_to_model`), so every caller
reaches the weight update by the same road.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..records import EditRecord
from ..requests import to_requests
from ..editing import WeightsSnapshot
from .hparams import COMEBAHKHyperParams
from .main import apply_comeba_hk_to_model
from .state import remove_hook_layers


def roll_back(model: nn.Module, snapshot: WeightsSnapshot) -> None:
    """Undo every edit since ``snapshot``: drop the hook layers and their state, restore the captured weights."""
    remove_hook_layers(model)
    snapshot.restore()


class LocateEditRun:
    """Batches edited one consecutive step each, on top of each other, until :meth:`roll_back`."""

    def __init__(self, model: nn.Module, tok: Any, hparams: COMEBAHKHyperParams) -> None:
        self.model, self.tok, self.hparams = model, tok, hparams
        self.snapshot = WeightsSnapshot(model)
        for name in hparams.rewrite_module_names():
            self.snapshot.capture_module(name)

    def edit(self, records: Sequence[EditRecord]) -> None:
        """One consecutive step on ``records`` (kept in the model)."""
        apply_comeba_hk_to_model(self.model, self.tok, to_requests(list(records)), self.hparams,
                                 return_orig_weights=False, keep_original_weight=False)

    def roll_back(self) -> None:
        roll_back(self.model, self.snapshot)
