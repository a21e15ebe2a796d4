"""Trained-hypernetwork archives: safetensors weights + JSON metadata in one directory.

Nothing is pickled, so loading can never execute code (stricter than ``torch.load(weights_only=True)``).
A directory is replaced atomically: it is written beside the target and renamed over it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .editor import HypernetEditor
from .hparams import HypernetHyperParams
from .trainer import TrainState

FORMAT = "smedit-hypernet/1"
WEIGHTS = "hypernet.safetensors"
OPTIMIZER = "optimizer.safetensors"
META = "meta.json"


class ArchiveError(ValueError):
    """The archive is missing, malformed, or was trained for another method/model/module layout."""


def _versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"smedit_plugin": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict]:
    index = {id(p): i for i, p in enumerate(params)}
    tensors: dict[str, torch.Tensor] = {}
    for p, st in opt.state.items():
        i = index[id(p)]
        for key, value in st.items():
            tensors[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, {"param_groups": groups, "n_params": len(params)}


def _load_optimizer_state(opt: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, torch.Tensor],
                          opt_meta: dict, path: Union[str, os.PathLike]) -> None:
    """Adam moments and step counts through ``load_state_dict``, which puts each on the device torch expects.

    Hyperparameters (lr, betas) stay those of the live hparams, so a resumed run can change ``meta_lr``.
    """
    if opt_meta.get("n_params") != len(params):
        raise ArchiveError(f"archive {path}: optimizer state is for {opt_meta.get('n_params')} hypernetwork "
                           f"tensors, the editor has {len(params)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
              for g in opt.param_groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_archive(path: Union[str, os.PathLike], editor: HypernetEditor, *, model_name: str,
                 optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[TrainState] = None,
                 extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the archive directory atomically (a crash leaves the previous archive intact)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in editor.nets.state_dict().items()}, str(tmp / WEIGHTS))
        meta: dict[str, Any] = {
            "format": FORMAT,
            "alg_name": editor.hparams.alg_name,
            "model_name": model_name,
            "num_seq": editor.num_seq,
            "structure": editor.describe(),
            "hparams": editor.hparams.to_dict(),
            "versions": _versions(),
            "train_state": dataclasses.asdict(state) if state is not None else None,
            **(extra or {}),
        }
        if optimizer is not None:
            tensors, opt_meta = _optimizer_tensors(optimizer, editor.unique_parameters())
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / OPTIMIZER))
            meta["optimizer"] = opt_meta
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(path: Union[str, os.PathLike]) -> dict[str, Any]:
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise ArchiveError(f"no hypernetwork archive at {p} (expected {META} and {WEIGHTS}); "
                           "train one with `smedit train HPARAMS --data FILE --out DIR` and set `archive: DIR`")
    try:
        meta = json.loads((p / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{p / META} is not valid JSON ({exc}); the archive is damaged, train or copy it again") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ArchiveError(f"{p}: unknown archive format {found!r} (expected {FORMAT!r})")
    return meta


def check_compatible(meta: dict[str, Any], editor: HypernetEditor, path: Union[str, os.PathLike]) -> None:
    """Raise with every difference between the archive and the editor built for the live model."""
    want = editor.describe()
    have = meta["structure"]
    diffs = []
    if meta["alg_name"] != editor.hparams.alg_name:
        diffs.append(f"method: archive {meta['alg_name']!r}, hparams {editor.hparams.alg_name!r}")
    for key in ("edit_modules", "shapes", "shared", "ranks", "n_blocks"):
        if have.get(key) != want.get(key):
            diffs.append(f"{key}: archive {have.get(key)!r}, model/hparams {want.get(key)!r}")
    if diffs:
        raise ArchiveError(f"archive {path} does not match this model and hparams:\n  - " + "\n  - ".join(diffs))


def load_archive(path: Union[str, os.PathLike], model: nn.Module, hparams: HypernetHyperParams, *,
                 with_optimizer: bool = False, device: Optional[torch.device] = None):
    """Build an editor for ``model`` and fill it from the archive (strict keys, checked shapes).

    Returns ``(editor, meta)`` or, with ``with_optimizer``, ``(editor, meta, optimizer, state)``.
    """
    meta = read_meta(path)
    editor = HypernetEditor(model, hparams, num_seq=meta["num_seq"], device=device)
    check_compatible(meta, editor, path)
    state_dict = load_file(str(Path(path) / WEIGHTS), device=str(editor.device))
    missing, unexpected = editor.nets.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ArchiveError(f"archive {path}: tensors missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    if not with_optimizer:
        return editor, meta
    params = editor.unique_parameters()
    opt = torch.optim.Adam(params, lr=hparams.meta_lr)
    opt_file = Path(path) / OPTIMIZER
    if opt_file.is_file():
        _load_optimizer_state(opt, params, load_file(str(opt_file)), meta.get("optimizer", {}), path)
    ts = meta.get("train_state")
    state = TrainState(**ts) if ts else TrainState()
    return editor, meta, opt, state
