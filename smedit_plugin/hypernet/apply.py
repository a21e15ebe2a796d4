"""Edit time for every hypernetwork method: EasyEdit's apply-function contract around the editor.

Each call applies ``bp_steps`` cumulative steps to the given requests with the trained networks
(normaliser frozen). Editors are cached per model object and archive, never in a process-wide
singleton that could outlive the model (contract §1.3, §7.4).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..editing import WeightsSnapshot, edit_transaction, maybe_copy_model, weights_copy_for_easyedit
from ..precision import RoundingReport, float32_edit_weights, wants_float32
from .archive import ArchiveError, load_archive
from .editor import HypernetEditor, hypernet_device
from .hparams import HypernetHyperParams

logger = logging.getLogger(__name__)

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


def apply_steps(model: nn.Module, tok, editor: HypernetEditor, prompts: Sequence[str],
                targets: Sequence[str]) -> RoundingReport:
    """``bp_steps`` cumulative BP steps on (prompt, target) tuples, the normaliser frozen.

    With ``fp32_edit_weights`` (default for bf16/fp16 models) the steps stack in float32 weights
    that are rounded once at the end; the report holds that rounding error (0 in float32).
    """
    mbs = editor.edit_micro_batches(tok, prompts, targets)
    modules = {n: editor.edit_module(n) for n in editor.module_names}
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    editor.set_normaliser_frozen(True)
    try:
        with float32_edit_weights(modules, wants_float32(modules, editor.hparams.fp32_edit_weights)) as rounding:
            for w in weights:
                w.requires_grad_(True)
            for s in range(editor.hparams.bp_steps):
                editor.bp_step(model, mbs, s, update_normaliser=False, for_meta_backward=False)
    finally:
        editor.set_normaliser_frozen(False)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    if rounding.relative_error:
        logger.info("edit rounded back to %s once; relative rounding error of each module's update: %s",
                    weights[0].dtype, {k: round(v, 4) for k, v in rounding.relative_error.items()})
    return rounding


def edit_batch(model: nn.Module, tok, editor: HypernetEditor, prompts: Sequence[str], targets: Sequence[str],
               snapshot: Optional[WeightsSnapshot] = None) -> WeightsSnapshot:
    """The one road from (prompt, target) pairs to a hypernetwork weight update, used by every caller.

    Runs :func:`apply_steps` inside an :func:`edit_transaction` and returns the snapshot of the
    edited weights: the caller keeps the edit, hands it to EasyEdit as ``weights_copy``, or rolls
    back with ``snapshot.restore()``. Pass an earlier ``snapshot`` to let edits accumulate under it.
    """
    with edit_transaction(model, snapshot) as snapshot:
        for name in editor.module_names:
            snapshot.capture_module(name)
        apply_steps(model, tok, editor, prompts, targets)
    return snapshot


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
