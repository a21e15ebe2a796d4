"""Building EasyEdit editors EasyEdit cannot build itself: models it cannot load by name, or a model in memory."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
from typing import Any, Optional

import torch

from .easyedit import detect_era, import_easyeditor


def describe_model(model: torch.nn.Module, name: Optional[str] = None) -> str:
    """A string for ``editor.model_name`` that EasyEdit's substring tests read correctly.

    EasyEdit evaluation switches to its seq2seq code when ``'t5'`` occurs anywhere in the name, so a
    decoder-only model whose path happens to contain ``t5`` is described by its architecture only.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    source = name or getattr(config, "_name_or_path", "") or ""
    base = os.path.basename(os.path.normpath(source)) if source else ""
    described = f"{model_type}:{base}" if base else str(model_type)
    is_t5 = "t5" in str(model_type).lower()
    if "t5" in described.lower() and not is_t5:
        return str(model_type)
    return described


def pypi_device_index(device: Any) -> int:
    """The GPU index the PyPI wheel formats into ``cuda:{device}`` (None -> 0, ``"cuda:1"`` -> 1, ``"2"`` -> 2)."""
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    text = str(device).strip()
    if text.isdigit():
        return int(text)
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"hparams field 'device' = {device!r}: the PyPI EasyEdit runs on a GPU only; give its index, "
                     "e.g. 0 or 'cuda:0'")


def _require_cuda_for_era_a() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the installed EasyEdit is the PyPI wheel (era A): its BaseEditor hard-codes 'cuda:{device}' and "
            "cannot run without CUDA. On CPU use EasyEdit's GitHub source (see tests/easyedit_env.md), or call "
            "the plugin's apply functions directly"
        )


def _editor_hparams(hparams: Any, model: torch.nn.Module, tokenizer: Any, **changes: Any) -> Any:
    """A validated copy of ``hparams`` whose ``model_name`` is ``(model, tokenizer)``.

    The model is shared, never copied; every other field is deep-copied, so what EasyEdit changes
    on its hparams (PyPI sets ``batch_size = 1``) never reaches the caller's object.
    """
    if not dataclasses.is_dataclass(hparams) or isinstance(hparams, type):
        raise TypeError(f"hparams must be a plugin or EasyEdit HyperParams dataclass instance, got "
                        f"{type(hparams).__name__}")
    values = {f.name: copy.deepcopy(getattr(hparams, f.name))
              for f in dataclasses.fields(hparams) if f.init and f.name != "model_name"}
    values.update(changes)
    return type(hparams)(model_name=(model, tokenizer), **values)


def load_editor(hparams: Any, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                name: Optional[str] = None) -> Any:
    """A ``BaseEditor`` for a model EasyEdit cannot load by name (Gemma, ``smollm2-135m``, a model in memory).

    Give ``model`` and ``tokenizer``, or only ``name`` (loaded with
    :func:`smedit_plugin.models.load_model_for`: ``model_dtype``, ``device`` and ``model_parallel``
    of the hparams), or neither (``hparams.model_name`` is used). The editor gets a copy of ``hparams`` whose ``model_name`` is the ``(model, tokenizer)``
    tuple; afterwards ``editor.model_name`` and ``editor.hparams.model_name`` are set to a
    descriptive string because EasyEdit's evaluation and methods (FT, ...) call ``.lower()`` on them.
    A tokenizer without a pad token gets its eos token as pad.
    The plugin methods must already be registered (:func:`smedit_plugin.registry.register`).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("load_editor needs both model and tokenizer, or neither (then `name` or hparams.model_name "
                         "is loaded)")
    source = hparams.model_name if name is None else name
    if model is None and not isinstance(source, tuple) and not (isinstance(source, str) and source.strip()):
        raise ValueError(f"hparams field 'model_name' = {source!r}: give a model name or pass model= and tokenizer=")
    import_easyeditor()
    changes: dict[str, Any] = {}
    if detect_era() == "A":
        _require_cuda_for_era_a()
        changes["device"] = pypi_device_index(getattr(hparams, "device", None))
    if model is None and isinstance(source, tuple):
        model, tokenizer = source
    elif model is None:
        from .models import load_model_for

        model, tokenizer = load_model_for(hparams, source)
        name = source
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before load_editor")
        tokenizer.pad_token = tokenizer.eos_token
    editor_class = importlib.import_module("easyeditor.editors.editor").BaseEditor
    editor = editor_class.from_hparams(_editor_hparams(hparams, model, tokenizer, **changes))
    editor.model_name = describe_model(model, name)
    editor.hparams.model_name = editor.model_name
    return editor
