"""Loading any method's hparams file: the class is chosen from its ``alg_name`` through the method table.

The classes themselves build on :class:`~smedit_plugin.hparams_base.MethodHyperParams`; this module sits
above them (it resolves the table's class strings), so no hparams class can reach it in a cycle.
"""
from __future__ import annotations

import os
from typing import Union

from .errors import HyperParamsError
from .hparams_base import MethodHyperParams, read_config
from .methods import canonical_alg_name, method_spec
from .resolve import hparams_class
from .shipped import method_yaml

__all__ = ["HyperParamsError", "MethodHyperParams", "canonical_alg_name", "load_hparams", "load_method_hparams",
           "read_config"]


def load_hparams(path: Union[str, os.PathLike]) -> MethodHyperParams:
    """Load any plugin hparams file, choosing the class from its ``alg_name`` (or legacy ``alg``)."""
    config, p = read_config(path)
    name = config.get("alg_name", config.get("alg"))
    if name is None:
        raise HyperParamsError(f"{p}: missing required field 'alg_name'")
    try:
        spec = method_spec(canonical_alg_name(name))
    except HyperParamsError as exc:
        raise HyperParamsError(f"{p}: {exc}") from None
    return hparams_class(spec.name).from_dict(config, source=str(p))


def load_method_hparams(method: str, model_key: str, *, training: bool = False, variant: str = "") -> MethodHyperParams:
    """The shipped (or ``$SMEDIT_HPARAMS_DIR``) YAML of ``method`` for ``model_key``, loaded; see
    :func:`~smedit_plugin.shipped.method_yaml` for which file that is."""
    try:
        path = method_yaml(method, model_key, training=training, variant=variant)
    except FileNotFoundError as exc:
        raise HyperParamsError(str(exc)) from None
    return load_hparams(path)
