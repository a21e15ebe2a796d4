"""Where the method table's ``"module:attribute"`` strings become code: the only place that imports them.

Resolving late keeps :mod:`smedit_plugin.methods` a leaf that anything may read, and keeps importing
the package free of the heavy method code. ``tests/test_architecture.py`` draws every string of the
table as an import edge of this module, so a cycle through a string is caught like any other.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from .methods import method_spec


def load_object(ref: str) -> Any:
    """The attribute named by ``"package.module:attribute"``."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


def hparams_class(name: str) -> type:
    """The hparams dataclass of method ``name`` (canonical name)."""
    return load_object(method_spec(name).hparams_path)


def apply_function(name: str) -> Callable:
    """The EasyEdit apply function ``apply_<method>_to_model`` of method ``name``."""
    return load_object(method_spec(name).apply_path)


def family_runner(name: str) -> type:
    """The :class:`~smedit_plugin.families.FamilyRunner` subclass that prepares, edits with and rolls back ``name``."""
    return load_object(method_spec(name).family)
