"""The one table of the plugin's methods; everything else (aliases, exports, families, defaults) is derived.

Adding a method = its folder (``hparams.py`` with the hparams class, ``main.py`` with
``apply_<method>_to_model``) plus one entry here; see ``docs/architecture.md``. This module is data
only: it imports nothing from the plugin and resolves none of its ``"module:attribute"`` strings
(:mod:`smedit_plugin.resolve` does), so any layer may read the table without an import cycle.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import HyperParamsError

#: The families: how a method is prepared, edits and is rolled back (``"module:FamilyRunner subclass"``).
HYPERNET_FAMILY = "smedit_plugin.hypernet.runner:HypernetRunner"
LOCATE_FAMILY = "smedit_plugin.comeba_hk.runner:LocateRunner"
#: EasyEdit's own methods (``easyedit:<METHOD>`` in ``smedit compare``), run through its ``BaseEditor``.
EASYEDIT_FAMILY = "smedit_plugin.easyedit_runs:EasyEditRunner"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method's name, where its code lives, and what EasyEdit and the CLI need to know about it.

    ``hparams_path``, ``apply_path`` and ``family`` are ``"module:attribute"`` strings, resolved only
    when used (:mod:`smedit_plugin.resolve`) so that reading the table stays cheap. Several methods may
    share an hparams class (a method and its one-step baseline); the first listed is that class's
    default ``alg_name``.
    """

    name: str
    hparams_path: str
    apply_path: str
    family: str
    batchable: bool
    summary: str
    aliases: tuple[str, ...] = ()
    default_bp_steps: int = 2  # hypernetwork methods: bp_steps when the YAML leaves it null
    hooks_enabled: bool = False  # locate-then-edit methods: edits kept in hook layers, weights untouched


def _spec(name: str, folder: str, hparams_class: str, apply_function: str, family: str, summary: str,
          **extra: Any) -> MethodSpec:
    """An entry whose code lives in ``smedit_plugin/<folder>/{hparams,main}.py`` (the EasyEdit layout)."""
    return MethodSpec(name, f"smedit_plugin.{folder}.hparams:{hparams_class}",
                      f"smedit_plugin.{folder}.main:{apply_function}", family, batchable=True, summary=summary,
                      **extra)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _spec("SMEdit", "smedit", "SMEditHyperParams", "apply_smedit_to_model", HYPERNET_FAMILY,
              "multi-step meta editing with an l2 norm constraint (batch and sequential)", aliases=("emsedit",)),
        _spec("MALMEN2", "malmen2", "MALMEN2HyperParams", "apply_malmen2_to_model", HYPERNET_FAMILY,
              "MALMEN with two backpropagation steps", aliases=("malmen^2", "malmen²")),
        _spec("MALMEN1", "malmen2", "MALMEN2HyperParams", "apply_malmen2_to_model", HYPERNET_FAMILY,
              "MALMEN baseline (one backpropagation step)", default_bp_steps=1),
        _spec("RLEdit2", "rledit2", "RLEdit2HyperParams", "apply_rledit2_to_model", HYPERNET_FAMILY,
              "RLEdit with two backpropagation steps (sequential editing)", aliases=("rledit^2", "rledit²")),
        _spec("RLEdit1", "rledit2", "RLEdit2HyperParams", "apply_rledit2_to_model", HYPERNET_FAMILY,
              "RLEdit baseline (one backpropagation step)", default_bp_steps=1),
        _spec("COMEBA-HK", "comeba_hk", "COMEBAHKHyperParams", "apply_comeba_hk_to_model", LOCATE_FAMILY,
              "consecutive batch editing with hook layers", aliases=("comeba_hk", "coachhook"), hooks_enabled=True),
        _spec("MEMIT-C", "comeba_hk", "COMEBAHKHyperParams", "apply_comeba_hk_to_model", LOCATE_FAMILY,
              "consecutive MEMIT without hooks (COMEBA-HK's baseline)", aliases=("memit_c",)),
    )
}

#: ``smedit compare`` / ``smedit bench`` default: the batch-editing hypernetwork methods of the SMEdit paper.
COMPARE_DEFAULT: tuple[str, ...] = ("SMEdit", "MALMEN2", "MALMEN1")
#: ``smedit demo`` default: a method that needs no training, so a fresh machine sees an edit within minutes.
DEMO_DEFAULT = "COMEBA-HK"


def aliases() -> dict[str, str]:
    """Accepted ``alg_name`` spellings (lower-cased) -> canonical name: each name itself plus its aliases.

    Read from the table at call time, so a method added to :data:`METHODS` is accepted at once.
    """
    return {alias: spec.name for spec in METHODS.values() for alias in (spec.name.lower(), *spec.aliases)}


def method_spec(name: str) -> MethodSpec:
    """The spec of a canonical method name; unknown names raise with the list of known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise HyperParamsError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def methods_of_family(family: str) -> list[str]:
    """The methods whose family runner is ``family`` (e.g. :data:`HYPERNET_FAMILY`), in table order."""
    return [spec.name for spec in METHODS.values() if spec.family == family]


def alg_names_of(hparams_path: str) -> tuple[str, ...]:
    """The names the hparams class at ``"module:Class"`` accepts as ``alg_name``, its default first."""
    return tuple(spec.name for spec in METHODS.values() if spec.hparams_path == hparams_path)


def canonical_alg_name(name: str) -> str:
    """Map an alias (``MALMEN^2``, ``malmen2``, ``CoachHooK``) to the registered name."""
    if not isinstance(name, str):
        raise HyperParamsError(f"alg_name must be a string, got {type(name).__name__}")
    known = aliases()
    key = name.strip().lower()
    if key in known:
        return known[key]
    squeezed = key.replace("-", "").replace("_", "").replace(" ", "")
    for alias, canonical in known.items():
        if alias.replace("-", "").replace("_", "") == squeezed:
            return canonical
    raise HyperParamsError(f"unknown method {name!r}; use one of {', '.join(sorted(set(known.values())))}")
