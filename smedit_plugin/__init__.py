"""smedit-plugin: SMEdit, MALMEN2, RLEdit2 and COMEBA-HK for EasyEdit.

Importing this package has no side effects (EasyEdit is not imported, nothing is registered);
names are resolved lazily on first access, the methods' ones from the table in :mod:`smedit_plugin.methods`. ``import smedit_plugin.auto`` registers the methods.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .methods import METHODS

_EXPORTS = {
    **{attr: module for spec in METHODS.values() for module, attr in
       (spec.hparams_path.split(":"), spec.apply_path.split(":"))},
    "register": "smedit_plugin.registry",
    "METHODS": "smedit_plugin.methods",
    "load_editor": "smedit_plugin.easyedit_editor",
    "install_transformers_shim": "smedit_plugin.easyedit",
    "load_hparams": "smedit_plugin.hparams",
    "HyperParamsError": "smedit_plugin.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smedit_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
