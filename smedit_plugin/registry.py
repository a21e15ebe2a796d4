"""The single table of the plugin's methods, and their registration into EasyEdit.

Nothing here runs at import time; :func:`register` is explicit and idempotent.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from .hparams import HyperParamsError


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Where a method's hparams class and apply function live, and how EasyEdit may call it."""

    name: str
    hparams_path: str  # "module:Class"
    apply_path: str  # "module:function"
    batchable: bool
    needs_archive: bool
    summary: str

    def hparams_class(self) -> type:
        module, attr = self.hparams_path.split(":")
        return getattr(importlib.import_module(module), attr)

    def apply_function(self) -> Callable:
        module, attr = self.apply_path.split(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("SMEdit", "smedit_plugin.smedit.hparams:SMEditHyperParams",
                   "smedit_plugin.smedit.main:apply_smedit_to_model", True, True,
                   "multi-step meta editing with an l2 norm constraint (batch and sequential)"),
        MethodSpec("MALMEN2", "smedit_plugin.malmen2.hparams:MALMEN2HyperParams",
                   "smedit_plugin.malmen2.main:apply_malmen2_to_model", True, True,
                   "MALMEN with two backpropagation steps"),
        MethodSpec("MALMEN1", "smedit_plugin.malmen2.hparams:MALMEN2HyperParams",
                   "smedit_plugin.malmen2.main:apply_malmen2_to_model", True, True,
                   "MALMEN baseline (one backpropagation step)"),
        MethodSpec("RLEdit2", "smedit_plugin.rledit2.hparams:RLEdit2HyperParams",
                   "smedit_plugin.rledit2.main:apply_rledit2_to_model", True, True,
                   "RLEdit with two backpropagation steps (sequential editing)"),
        MethodSpec("RLEdit1", "smedit_plugin.rledit2.hparams:RLEdit2HyperParams",
                   "smedit_plugin.rledit2.main:apply_rledit2_to_model", True, True,
                   "RLEdit baseline (one backpropagation step)"),
        MethodSpec("COMEBA-HK", "smedit_plugin.comeba_hk.hparams:COMEBAHKHyperParams",
                   "smedit_plugin.comeba_hk.main:apply_comeba_hk_to_model", True, False,
                   "consecutive batch editing with hook layers"),
        MethodSpec("MEMIT-C", "smedit_plugin.comeba_hk.hparams:COMEBAHKHyperParams",
                   "smedit_plugin.comeba_hk.main:apply_comeba_hk_to_model", True, False,
                   "consecutive MEMIT without hooks (COMEBA-HK's baseline)"),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The spec of a canonical method name; unknown names raise with the list of known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise HyperParamsError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None
