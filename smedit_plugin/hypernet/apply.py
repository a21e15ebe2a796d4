"""Edit time for every hypernetwork method: EasyEdit's apply-function contract around the editor.

Each call applies ``bp_steps`` cumulative steps to the given requests with the trained networks
(normaliser frozen). Editors are cached per model object and archive, never in a process-wide
singleton that could outlive the model (contract §1.3, §7.4).
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..editing import maybe_copy_model, weights_copy_for_easyedit
from .archive import ArchiveError, load_archive
from .editor import HypernetEditor, edit_batch, hypernet_device
from .hparams import HypernetHyperParams

_EDITORS: "weakref.WeakKeyDictionary[nn.Module, _CachedEditor]" = weakref.WeakKeyDictionary()


def validate_requests(requests: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Prompts and targets of EasyEdit request dicts; raises before any weight is touched."""
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError("requests must be a non-empty list of dicts with 'prompt' and 'target_new'")
    prompts, targets = [], []
    for i, req in enumerate(requests):
        if not isinstance(req, dict):
            raise ValueError(f"request {i} must be a dict with 'prompt' and 'target_new', got {type(req).__name__}")
        for key in ("prompt", "target_new"):
            value = req.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"request {i}: field {key!r} must be a non-empty string, got {value!r}")
        prompts.append(req["prompt"])
        targets.append(req["target_new"])
    return prompts, targets


@dataclasses.dataclass(frozen=True)
class _CachedEditor:
    archive: tuple[str, Optional[float], str]  # path, meta.json mtime, hypernetwork device
    hparams: HypernetHyperParams  # a private copy of the hparams the editor was loaded with
    editor: HypernetEditor


def editor_for(model: nn.Module, hparams: HypernetHyperParams) -> HypernetEditor:
    """The trained editor named by ``hparams.archive``, loaded once per (model, archive, archive mtime, hparams).

    The hparams are compared (as dataclasses, field by field) because the editor keeps the ones it
    was loaded with (``bp_steps``, ``micro_batch_size``, ...); a later call with other values must not reuse them.
    """
    if not hparams.archive:
        raise ArchiveError(f"{hparams.alg_name} needs a trained hypernetwork: set `archive:` in the hparams to the "
                           "directory written by `smedit train` (see hparams/TRAINING/)")
    meta_file = os.path.join(hparams.archive, "meta.json")
    stamp = os.path.getmtime(meta_file) if os.path.isfile(meta_file) else None
    device = hypernet_device(hparams)
    archive = (os.path.abspath(hparams.archive), stamp, str(device))
    cached = _EDITORS.get(model)
    if cached is None or cached.archive != archive or cached.hparams != hparams:
        editor, _ = load_archive(hparams.archive, model, hparams, device=device)
        cached = _CachedEditor(archive, hparams.replace(), editor)
        _EDITORS[model] = cached
    cached.editor.bind(model)
    return cached.editor


def apply_hypernet_to_model(model: nn.Module, tok, requests: Sequence[dict[str, Any]], hparams: HypernetHyperParams,
                            copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
                            **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit apply function shared by SMEdit, MALMEN2/1 and RLEdit2/1 (extra kwargs are ignored)."""
    prompts, targets = validate_requests(requests)
    model = maybe_copy_model(model, copy)
    snapshot = edit_batch(model, tok, editor_for(model, hparams), prompts, targets)
    return model, weights_copy_for_easyedit(snapshot, return_orig_weights=return_orig_weights,
                                            keep_original_weight=keep_original_weight)


def make_apply_function(hparams_class: type, name: str):
    """An ``apply_<method>_to_model`` that type-checks its hparams, then runs :func:`apply_hypernet_to_model`."""

    def apply(model: nn.Module, tok, requests: Sequence[dict[str, Any]], hparams: HypernetHyperParams,
              copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
              **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        if not isinstance(hparams, hparams_class):
            raise TypeError(f"{name} needs {hparams_class.__name__}, got {type(hparams).__name__}")
        return apply_hypernet_to_model(model, tok, requests, hparams, copy=copy,
                                       return_orig_weights=return_orig_weights,
                                       keep_original_weight=keep_original_weight, **kwargs)

    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = (f"Edit ``model`` in place with the trained {hparams_class.__name__[:-11]} hypernetworks named by "
                     "``hparams.archive``; returns ``(model, weights_copy)`` with the installed EasyEdit era's semantics.")
    return apply
