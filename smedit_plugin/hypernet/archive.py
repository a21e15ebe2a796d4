"""Trained-hypernetwork archives: safetensors weights + JSON metadata in a versioned directory.

Nothing is pickled, so loading can never execute code (stricter than ``torch.load(weights_only=True)``).
Every save publishes a complete new version with one rename (:func:`~smedit_plugin.fileio.write_version`),
so the directory always holds a loadable archive; loading verifies each file's sha256, the
structure, the model's identity and every tensor's name, shape, dtype and finiteness, and that the
learned edit rates and ridge coefficients lie in the range training can reach, before the editor is filled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import current_version, is_versioned_dir, write_version
from .editor import HypernetEditor
from .hparams import HypernetHyperParams
from .trainer import TrainState

FORMAT = "smedit-hypernet/2"
WEIGHTS = "hypernet.safetensors"
OPTIMIZER = "optimizer.safetensors"
META = "meta.json"
#: Largest change of one Adam step, in units of ``meta_lr``: ``|m_hat / sqrt(v_hat)|`` stays below
#: ``(1 - beta1) / sqrt(1 - beta2)`` = 3.2 for torch's default betas; 10 leaves a margin. A learned edit rate
#: ``lr`` or ridge exponent ``lamda`` further from its initial value than this many steps allow was not trained.
ADAM_STEP_BOUND = 10.0
#: Largest relative distance between the recorded and the live identity probe still taken for the same
#: model: covers bf16/fp16 rounding (< 1 %); another checkpoint of the same shape differs by ~140 %.
PROBE_TOLERANCE = 0.05


class ArchiveError(ValueError):
    """The archive is missing, malformed, or was trained for another method/model/module layout."""


def _versions() -> dict[str, str]:
    import transformers

    from .._version import __version__

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
                          opt_meta: Any, source: Path) -> None:
    """Adam moments and step counts through ``load_state_dict``, which puts each on the device torch expects.

    Hyperparameters (lr, betas) stay those of the live hparams, so a resumed run can change ``meta_lr``.
    Every entry is checked (index, shape, finiteness) before the optimizer is touched.
    """
    if not isinstance(opt_meta, dict) or opt_meta.get("n_params") != len(params):
        found = opt_meta.get("n_params") if isinstance(opt_meta, dict) else None
        raise ArchiveError(f"{source}: optimizer state is for {found} hypernetwork tensors, the editor has {len(params)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not name:
            raise ArchiveError(f"{source}: unexpected optimizer tensor {key!r}")
        param = params[int(index)]
        if name in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(param.shape):
            raise ArchiveError(f"{source}: optimizer tensor {key!r} has shape {tuple(value.shape)}, "
                               f"its parameter {tuple(param.shape)}")
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise ArchiveError(f"{source}: optimizer tensor {key!r} holds NaN/inf")
        state.setdefault(int(index), {})[name] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
              for g in opt.param_groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_archive(path: Union[str, os.PathLike], editor: HypernetEditor, *, model_name: str,
                 optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[TrainState] = None,
                 extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """Publish a new version of the archive at ``path`` (a crash or Ctrl-C leaves the previous one intact).

    A folder holding entries the plugin did not write is refused unless ``overwrite`` (then the archive is
    written beside them; they are never deleted). The editor's ``identity`` (a probe of the model it was built on, see
    :func:`~smedit_plugin.hypernet.editor.identity_probe`) is recorded so that loading can refuse
    another model of the same shapes. Returns ``path``.
    """
    meta: dict[str, Any] = {
        "format": FORMAT,
        "alg_name": editor.hparams.alg_name,
        "model_name": model_name,
        "identity_probe": editor.identity,
        "num_seq": editor.num_seq,
        "structure": editor.describe(),
        "hparams": editor.hparams.to_dict(),
        "versions": _versions(),
        "train_state": dataclasses.asdict(state) if state is not None else None,
        **(extra or {}),
    }
    weights = {k: v.detach().contiguous().cpu() for k, v in editor.nets.state_dict().items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer, editor.unique_parameters())

    def write(folder: Path) -> None:
        save_file(weights, str(folder / WEIGHTS))
        if optimizer is not None:
            save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(folder / OPTIMIZER))
        (folder / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")

    write_version(path, FORMAT, write, ArchiveError, required=(META, WEIGHTS), overwrite=overwrite)
    return Path(path)


def archive_folder(path: Union[str, os.PathLike]) -> Path:
    """The folder of the archive's published version, every file's checksum verified.

    ``path`` may also name one version folder (``DIR/v-000003``): it is checked against its own version
    record, the way to load an intact version when ``DIR/manifest.json`` is damaged.
    """
    p = Path(path)
    if not is_versioned_dir(p):
        if (p / META).is_file():
            raise ArchiveError(f"{p} is an archive of an older smedit-plugin (no manifest.json, no checksums); "
                               "train it again with `smedit train`")
        raise ArchiveError(f"no hypernetwork archive at {p} (expected manifest.json naming {META} and {WEIGHTS}); "
                           "train one with `smedit train HPARAMS --data FILE --out DIR` and set `archive: DIR`")
    return current_version(p, FORMAT, ArchiveError, required=(META, WEIGHTS))


_META_FIELDS = {"alg_name": str, "model_name": str, "identity_probe": list, "num_seq": int, "structure": dict,
                "hparams": dict}


def read_meta(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The archive's metadata, after its checksums and required fields are verified."""
    return _meta_of(archive_folder(path))


def _meta_of(folder: Path) -> dict[str, Any]:
    file = folder / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{file} is not valid JSON ({exc}); the archive is damaged, train or copy it again") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ArchiveError(f"{file}: unknown archive format {found!r} (expected {FORMAT!r})")
    for key, kind in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ArchiveError(f"{file}: field {key!r} is missing or not a {kind.__name__}; the archive is damaged")
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
    recorded, live = meta["identity_probe"], editor.identity
    if len(recorded) != len(live) or not all(isinstance(x, (int, float)) for x in recorded):
        raise ArchiveError(f"archive {path}: meta.json field 'identity_probe' is malformed; the archive is damaged")
    if live:
        saved, current = torch.tensor(recorded, dtype=torch.float64), torch.tensor(live, dtype=torch.float64)
        distance = float((current - saved).norm() / saved.norm().clamp_min(1e-12))
        if not distance <= PROBE_TOLERANCE:
            raise ArchiveError(
                f"archive {path} was trained on another model ({meta['model_name']!r}): this model's weights differ "
                f"from that one's by {100 * distance:.0f} % at the probed entries (at most {100 * PROBE_TOLERANCE:.0f} % "
                "allowed, for dtype rounding); load it into the model it was trained on, or train one for this model")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArchiveError(f"{file} is not a readable safetensors file ({exc}); the archive is damaged") from exc


def _check_weights(tensors: dict[str, torch.Tensor], editor: HypernetEditor, file: Path) -> None:
    """Names, shapes, dtypes and finiteness of every hypernetwork tensor, before any is loaded."""
    want = editor.nets.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ArchiveError(f"{file}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(want[key].shape) or value.dtype != want[key].dtype:
            raise ArchiveError(f"{file}: tensor {key!r} is {value.dtype} {tuple(value.shape)}, the editor expects "
                               f"{want[key].dtype} {tuple(want[key].shape)}")
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise ArchiveError(f"{file}: tensor {key!r} holds NaN/inf; the archive is damaged or training diverged")


def _check_learned_scalars(tensors: dict[str, torch.Tensor], meta: dict[str, Any], file: Path) -> None:
    """Edit rates (``lr``) and ridge exponents (``lamda``) within what training can reach; normaliser spreads >= 0.

    Each starts at a known value (``hparams.lr``, 0) and moves by at most ``ADAM_STEP_BOUND * meta_lr`` per
    optimiser step (``bp_steps`` Adam updates per step with ``reference_adam_duplicates``). A value beyond
    that, even a finite one like 1e30, would make every edit's weights overflow, so it is refused here.
    """
    settings = [meta["hparams"]] + [entry.get("training_fingerprint", {}) for entry in meta.get("fingerprint_history", [])
                                    if isinstance(entry, dict)]
    lrs, meta_lrs, bp = ([float(h[key]) for h in settings if isinstance(h.get(key), (int, float))]
                         for key in ("lr", "meta_lr", "bp_steps"))
    if not lrs or not meta_lrs:
        raise ArchiveError(f"{file.parent / META}: field 'hparams' lacks 'lr' or 'meta_lr'; the archive is damaged")
    train_state = meta.get("train_state") if isinstance(meta.get("train_state"), dict) else {}
    steps = train_state.get("optimizer_steps", 0)
    steps = steps if isinstance(steps, int) and steps > 0 else 1
    reach = ADAM_STEP_BOUND * max(meta_lrs) * steps * max(bp or [1.0])
    for key, value in tensors.items():
        name = key.rsplit(".", 2)[-2:]
        if name in (["lr", "weight"], ["lamda", "weight"]):
            start = max(abs(x) for x in lrs) if name[0] == "lr" else 0.0
            worst = float(value.double().abs().max())
            if not worst <= start + reach:
                what = "edit rate" if name[0] == "lr" else "ridge exponent"
                raise ArchiveError(
                    f"{file}: learned {what} {key!r} reaches {worst:.3g}, beyond what {steps} optimiser step(s) from "
                    f"{start:g} with meta_lr {max(meta_lrs):g} can produce (|value| <= {start + reach:.3g}); the archive "
                    "was altered or damaged, train it again")
        elif name[-1] in ("std", "var") and bool((value < 0).any()):
            raise ArchiveError(f"{file}: normaliser statistic {key!r} is negative; the archive is damaged")


def load_archive(path: Union[str, os.PathLike], model: nn.Module, hparams: HypernetHyperParams, *,
                 with_optimizer: bool = False, device: Optional[torch.device] = None):
    """Build an editor for ``model`` and fill it from the archive, after checking everything.

    Checksums, metadata, structure, the model's identity and every tensor are verified first; the
    model itself is never written. Returns ``(editor, meta)`` or, with ``with_optimizer``,
    ``(editor, meta, optimizer, state)``.
    """
    folder = archive_folder(path)
    meta = _meta_of(folder)
    if meta["num_seq"] < 1:
        raise ArchiveError(f"{folder / META}: field 'num_seq' = {meta['num_seq']} must be >= 1; the archive is damaged")
    editor = HypernetEditor(model, hparams, num_seq=meta["num_seq"], device=device)
    check_compatible(meta, editor, path)
    tensors = _read_tensors(folder / WEIGHTS)
    _check_weights(tensors, editor, folder / WEIGHTS)
    _check_learned_scalars(tensors, meta, folder / WEIGHTS)
    opt_tensors = None
    if with_optimizer and (folder / OPTIMIZER).is_file():
        opt_tensors = _read_tensors(folder / OPTIMIZER)
    ts = meta.get("train_state") if with_optimizer else None
    try:
        state = TrainState(**ts) if ts else TrainState()
    except TypeError as exc:
        raise ArchiveError(f"{folder / META}: field 'train_state' is malformed ({exc})") from exc
    editor.nets.load_state_dict({k: v.to(editor.device) for k, v in tensors.items()}, strict=True)
    if not with_optimizer:
        return editor, meta
    params = editor.unique_parameters()
    opt = torch.optim.Adam(params, lr=hparams.meta_lr)
    if opt_tensors is not None:
        _load_optimizer_state(opt, params, opt_tensors, meta.get("optimizer"), folder / OPTIMIZER)
    return editor, meta, opt, state
