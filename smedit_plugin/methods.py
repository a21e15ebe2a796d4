"""The one table of the plugin's methods; everything else (aliases, exports, kinds, defaults) is derived.

Adding a method = its folder (``hparams.py`` with the hparams class, ``main.py`` with
``apply_<method>_to_model``) plus one entry here; see the README's "Adding a method". This module imports nothing
from the plugin, so any layer may read the table without an import cycle.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from .errors import HyperParamsError


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method's name, where its code lives, and what EasyEdit and the CLI need to know about it.

    ``hparams_path`` / ``apply_path`` are ``"module:attribute"``, imported only when used so that
    reading the table stays cheap. Several methods may share an hparams class (a method and its
    one-step baseline); the first listed is that class's default ``alg_name``.
    """

    name: str
    hparams_path: str
    apply_path: str
    batchable: bool
    needs_archive: bool  # a hypernetwork method (trains an archive); else a locate-then-edit method
    summary: str
    aliases: tuple[str, ...] = ()
    default_bp_steps: int = 2  # hypernetwork methods: bp_steps when the YAML leaves it null

    def hparams_class(self) -> type:
        module, attr = self.hparams_path.split(":")
        return getattr(importlib.import_module(module), attr)

    def apply_function(self) -> Callable:
        module, attr = self.apply_path.split(":")
        return getattr(importlib.import_module(module), attr)


def _spec(name: str, folder: str, hparams_class: str, apply_function: str, summary: str, *, archive: bool,
          **extra: Any) -> MethodSpec:
    """An entry whose code lives in ``smedit_plugin/<folder>/{hparams,main}.py`` (the EasyEdit layout)."""
    return MethodSpec(name, f"smedit_plugin.{folder}.hparams:{hparams_class}",
                      f"smedit_plugin.{folder}.main:{apply_function}", batchable=True, needs_archive=archive,
                      summary=summary, **extra)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _spec("SMEdit", "smedit", "SMEditHyperParams", "apply_smedit_to_model",
              "multi-step meta editing with an l2 norm constraint (batch and sequential)", archive=True,
              aliases=("emsedit",)),
        _spec("MALMEN2", "malmen2", "MALMEN2HyperParams", "apply_malmen2_to_model",
              "MALMEN with two backpropagation steps", archive=True, aliases=("malmen^2", "malmen²")),
        _spec("MALMEN1", "malmen2", "MALMEN2HyperParams", "apply_malmen2_to_model",
              "MALMEN baseline (one backpropagation step)", archive=True, default_bp_steps=1),
        _spec("RLEdit2", "rledit2", "RLEdit2HyperParams", "apply_rledit2_to_model",
              "RLEdit with two backpropagation steps (sequential editing)", archive=True,
              aliases=("rledit^2", "rledit²")),
        _spec("RLEdit1", "rledit2", "RLEdit2HyperParams", "apply_rledit2_to_model",
              "RLEdit baseline (one backpropagation step)", archive=True, default_bp_steps=1),
        _spec("COMEBA-HK", "comeba_hk", "COMEBAHKHyperParams", "apply_comeba_hk_to_model",
              "consecutive batch editing with hook layers", archive=False, aliases=("comeba_hk", "coachhook")),
        _spec("MEMIT-C", "comeba_hk", "COMEBAHKHyperParams", "apply_comeba_hk_to_model",
              "consecutive MEMIT without hooks (COMEBA-HK's baseline)", archive=False, aliases=("memit_c",)),
    )
}

#: ``smedit compare`` / ``smedit bench`` default: the batch-editing hypernetwork methods of the SMEdit paper.
COMPARE_DEFAULT: tuple[str, ...] = ("SMEdit", "MALMEN2", "MALMEN1")
#: ``smedit demo`` default: a method that needs no training, so a fresh machine sees an edit within minutes.
DEMO_DEFAULT = "COMEBA-HK"

#: Accepted ``alg_name`` spellings (lower-cased) -> canonical name: each name itself plus its aliases.
ALIASES: dict[str, str] = {alias: spec.name for spec in METHODS.values()
                            for alias in (spec.name.lower(), *spec.aliases)}


def method_spec(name: str) -> MethodSpec:
    """The spec of a canonical method name; unknown names raise with the list of known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise HyperParamsError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def method_names(*, needs_archive: bool) -> list[str]:
    """The hypernetwork methods (``needs_archive=True``) or the locate-then-edit ones, in table order."""
    return [spec.name for spec in METHODS.values() if spec.needs_archive == needs_archive]


def alg_names_of(hparams_path: str) -> tuple[str, ...]:
    """The names the hparams class at ``"module:Class"`` accepts as ``alg_name``, its default first."""
    return tuple(spec.name for spec in METHODS.values() if spec.hparams_path == hparams_path)


def canonical_alg_name(name: str) -> str:
    """Map an alias (``MALMEN^2``, ``malmen2``, ``CoachHooK``) to the registered name."""
    if not isinstance(name, str):
        raise HyperParamsError(f"alg_name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    squeezed = key.replace("-", "").replace("_", "").replace(" ", "")
    for alias, canonical in ALIASES.items():
        if alias.replace("-", "").replace("_", "") == squeezed:
            return canonical
    raise HyperParamsError(f"unknown method {name!r}; use one of {', '.join(sorted(set(ALIASES.values())))}")
