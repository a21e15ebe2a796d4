"""smedit-plugin: SMEdit, MALMEN2, RLEdit2 and COMEBA-HK for EasyEdit.

Importing this package has no side effects (EasyEdit is not imported, nothing is registered);
names are resolved lazily on first access. ``import smedit_plugin.auto`` registers the methods.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SMEditHyperParams": "smedit_plugin.smedit.hparams",
    "MALMEN2HyperParams": "smedit_plugin.malmen2.hparams",
    "RLEdit2HyperParams": "smedit_plugin.rledit2.hparams",
    "COMEBAHKHyperParams": "smedit_plugin.comeba_hk.hparams",
    "apply_smedit_to_model": "smedit_plugin.smedit.main",
    "apply_malmen2_to_model": "smedit_plugin.malmen2.main",
    "apply_rledit2_to_model": "smedit_plugin.rledit2.main",
    "apply_comeba_hk_to_model": "smedit_plugin.comeba_hk.main",
    "register": "smedit_plugin.registry",
    "METHODS": "smedit_plugin.registry",
    "load_editor": "smedit_plugin.easyedit",
    "install_transformers_shim": "smedit_plugin.easyedit",
    "load_hparams": "smedit_plugin.hparams",
    "HyperParamsError": "smedit_plugin.hparams",
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
