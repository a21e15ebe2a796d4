"""Registration of the method table (:mod:`smedit_plugin.methods`) into EasyEdit.

Nothing here runs at import time; :func:`register` is explicit and idempotent.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Callable, Iterable, Optional

from .methods import METHODS, canonical_alg_name, method_spec
from .resolve import apply_function

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Registration into EasyEdit (contract §1.1, §1.2, §7.1)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RegistrationReport:
    """What one :func:`register` call did, and which EasyEdit it found."""

    added: tuple[str, ...]
    already_registered: tuple[str, ...]
    replaced: tuple[str, ...]
    batchable: tuple[str, ...]
    newly_batchable: tuple[str, ...]
    era: Optional[str]  # "A" (PyPI wheel, keep_original_weight) or "C" (GitHub HEAD, sequential_edit)
    capabilities: dict[str, bool]

    @property
    def changed(self) -> bool:
        """False when the call was a no-op (everything was registered as asked before)."""
        return bool(self.added or self.replaced or self.newly_batchable)


def make_easyedit_apply(name: str) -> Callable:
    """The ``ALG_DICT`` value for ``name``: imports the real apply function on first call only.

    Registering must stay cheap, and the method modules pull in the heavy parts (hypernetworks,
    solvers). The wrapper is marked with ``_smedit_method`` so that :func:`register` recognises
    entries it owns.
    """
    spec = method_spec(name)
    resolved: list[Callable] = []

    def apply(model: Any, tok: Any, requests: list, hparams: Any, copy: bool = False,
              return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs: Any) -> Any:
        if not resolved:
            resolved.append(apply_function(name))
        return resolved[0](model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                           keep_original_weight=keep_original_weight, **kwargs)

    apply.__name__ = apply.__qualname__ = f"smedit_{name.lower().replace('-', '_')}_apply"
    apply.__doc__ = f"EasyEdit entry point of {name} ({spec.summary}); runs {spec.apply_path}."
    apply._smedit_method = name  # type: ignore[attr-defined]
    return apply


def _owned(value: Any) -> bool:
    return getattr(value, "_smedit_method", None) is not None


def _batchable_wrapper(batch_editor: type) -> Callable:
    """Install (once) and return the ``BatchEditor.is_batchable_method`` wrapper.

    The Enum cannot gain members, but its class attribute can be replaced by a staticmethod; the
    wrapper answers True for the names in its ``_smedit_names`` set and asks the original otherwise.
    """
    current = batch_editor.__dict__["is_batchable_method"].__func__
    if getattr(current, "_smedit_wrapped", False):
        return current
    names: set[str] = set()

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in names or current(alg_name)

    is_batchable_method.__doc__ = current.__doc__
    is_batchable_method._smedit_wrapped = True  # type: ignore[attr-defined]
    is_batchable_method._smedit_names = names  # type: ignore[attr-defined]
    is_batchable_method._smedit_original = current  # type: ignore[attr-defined]
    setattr(batch_editor, "is_batchable_method", staticmethod(is_batchable_method))
    return is_batchable_method


def register(methods: Optional[Iterable[str]] = None, *, batchable: bool = True,
             override: bool = False) -> RegistrationReport:
    """Add the plugin's methods to the installed EasyEdit; explicit, idempotent, and all-or-nothing.

    ``methods``: names or aliases (default: every method in :data:`METHODS`). Each goes into
    ``easyeditor.util.alg_dict.ALG_DICT`` in place (the editor holds that same dict object).
    ``batchable``: also make the batch-capable ones pass ``BatchEditor.is_batchable_method``, so
    ``batch_edit`` accepts them. ``override``: replace an entry of that name that this plugin does
    not own; without it such a collision raises before anything is changed. On the PyPI wheel call
    :func:`smedit_plugin.easyedit.install_transformers_shim` first.
    """
    from .easyedit import detect_era, easyedit_capabilities, import_easyeditor

    names = list(METHODS) if methods is None else [m if m in METHODS else canonical_alg_name(m) for m in methods]
    for name in names:
        method_spec(name)
    import_easyeditor()
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch_editor = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    foreign = [n for n in names if n in alg_dict and not _owned(alg_dict[n])]
    if foreign and not override:
        raise ValueError(
            f"EasyEdit's ALG_DICT already has {', '.join(map(repr, foreign))} registered by someone else "
            f"({', '.join(repr(alg_dict[n]) for n in foreign)}); pass override=True to replace, or register "
            "only the other methods"
        )
    added, already, replaced = [], [], []
    for name in names:
        if name in alg_dict and _owned(alg_dict[name]):
            already.append(name)
            continue
        (replaced if name in alg_dict else added).append(name)
        alg_dict[name] = make_easyedit_apply(name)
    newly_batchable: list[str] = []
    if batchable:
        wrapper = _batchable_wrapper(batch_editor)
        newly_batchable = [n for n in names if METHODS[n].batchable and n not in wrapper._smedit_names]
        wrapper._smedit_names.update(newly_batchable)
    wrapped = batch_editor.__dict__["is_batchable_method"].__func__
    report = RegistrationReport(
        added=tuple(added), already_registered=tuple(already), replaced=tuple(replaced),
        batchable=tuple(n for n in names if n in getattr(wrapped, "_smedit_names", ())),
        newly_batchable=tuple(newly_batchable), era=detect_era(), capabilities=easyedit_capabilities(),
    )
    LOG.info("smedit_plugin.register: added %s, already registered %s, replaced %s, batchable %s; EasyEdit era %s %s",
             list(report.added), list(report.already_registered), list(report.replaced), list(report.batchable),
             report.era, report.capabilities)
    return report
