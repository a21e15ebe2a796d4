"""Methods run end to end through the installed EasyEdit's ``BaseEditor``, for side-by-side comparisons.

Two uses in ``smedit compare``: EasyEdit's own methods (``easyedit:FT``, ``easyedit:MEMIT``, ...)
with EasyEdit's own YAML, and ``--via-easyedit`` for the plugin's methods, so EasyEdit's metric
dicts sit next to ours. Edits are applied with ``sequential_edit=True`` so they stay in the model
for our scoring; the caller restores the model from a :class:`~smedit_plugin.editing.WeightsSnapshot`.
When EasyEdit cannot run a method here, :class:`EasyEditUnavailable` carries the reason for the row.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tqdm.auto import tqdm

from .records import EditRecord
from .requests import to_edit_kwargs

EASYEDIT_PREFIX = "easyedit:"


class EasyEditUnavailable(RuntimeError):
    """EasyEdit cannot run this method on this machine; the message says why (it goes into the result row)."""


def split_method(name: str) -> tuple[bool, str]:
    """``("easyedit:FT")`` -> ``(True, "FT")``; plugin methods -> ``(False, name)``."""
    if name.lower().startswith(EASYEDIT_PREFIX):
        inner = name[len(EASYEDIT_PREFIX):].strip()
        if not inner:
            raise ValueError(f"--methods entry {name!r} names no EasyEdit method; write e.g. easyedit:FT")
        return True, inner
    return False, name


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def builtin_hparams_path(method: str, model_key: str, root: Path) -> Path:
    """``root/<method>/<model_key>.yaml`` (EasyEdit's layout: ``hparams/FT/llama3-8b.yaml``)."""
    for suffix in (".yaml", ".yml"):
        path = root / method / f"{model_key}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no EasyEdit hparams for easyedit:{method} and model {model_key!r}: expected "
                            f"{root / method / (model_key + '.yaml')}; point --easyedit-hparams at a folder laid out "
                            "like EasyEdit's hparams/ (METHOD/MODEL.yaml)")


def import_runnable_easyedit() -> Any:
    """The installed ``easyeditor``, or :class:`EasyEditUnavailable` if its ``BaseEditor`` cannot run here."""
    from . import easyedit

    try:
        easyedit.install_transformers_shim()
        module = easyedit.import_easyeditor(tolerate_missing_vision=True)
    except ImportError as exc:
        raise EasyEditUnavailable(f"EasyEdit is not importable: {exc}") from None
    if easyedit.detect_era() == "A" and not torch.cuda.is_available():
        raise EasyEditUnavailable("the installed EasyEdit (0.0.1.dev0, the 2023 wheel) hard-codes CUDA in BaseEditor "
                                  "and there is no GPU; put EasyEdit's current source on PYTHONPATH "
                                  "(tests/easyedit_env.md)")
    return module


def builtin_hparams_class(module: Any, alg_name: str) -> type:
    """EasyEdit's ``<ALG>HyperParams`` class for ``alg_name`` (``FT`` -> ``FTHyperParams``, ``R-ROME`` -> ``R_ROMEHyperParams``)."""
    wanted = _normalise(alg_name) + "hyperparams"
    for attr in dir(module):
        if _normalise(attr) == wanted and isinstance(getattr(module, attr), type):
            return getattr(module, attr)
    raise EasyEditUnavailable(f"the installed EasyEdit has no hyperparameter class for {alg_name!r}")


def load_builtin_hparams(method: str, model_key: str, root: Path) -> Any:
    """EasyEdit's own hparams object for ``easyedit:<method>`` from ``root/<method>/<model_key>.yaml``."""
    import yaml

    module = import_runnable_easyedit()
    path = builtin_hparams_path(method, model_key, root)
    alg_name = (yaml.safe_load(path.read_text()) or {}).get("alg_name", method)
    return builtin_hparams_class(module, alg_name).from_hparams(str(path))


def easyedit_stats_file(hparams: Any, model: torch.nn.Module, layer: int) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for a layer's cached second moment (its own naming scheme)."""
    model_name = str(model.config._name_or_path).rsplit("/")[-1]
    layer_name = hparams.rewrite_module_tmp.format(layer)
    name = f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz"
    return Path(hparams.stats_dir) / model_name / f"{hparams.mom2_dataset}_stats" / name


def seed_covariance_from_text(hparams: Any, model: torch.nn.Module, tok: Any, text: Path) -> list[Path]:
    """Write EasyEdit's covariance cache for each edit layer from a local text file.

    EasyEdit's MEMIT family downloads Wikipedia for ``E[k kᵀ]`` unless ``layer_stats`` finds its
    ``.npz`` cache; without network that download fails, so the cache is filled from ``text`` (all
    its lines, however many ``mom2_n_samples`` asks for) in EasyEdit's ``SecondMoment`` layout.
    Existing files are kept.
    """
    from .comeba_hk.covariance import collect_second_moments, read_documents
    from .fileio import atomic_path

    layers = list(hparams.layers)
    files = {layer: easyedit_stats_file(hparams, model, layer) for layer in layers}
    missing = {layer: f for layer, f in files.items() if not f.is_file()}
    if not missing:
        return list(files.values())
    modules = {hparams.rewrite_module_tmp.format(layer): model.get_submodule(hparams.rewrite_module_tmp.format(layer))
               for layer in missing}
    stop = model.get_submodule(hparams.rewrite_module_tmp.format(max(missing)))
    dtype = getattr(torch, hparams.mom2_dtype)
    collected = collect_second_moments(model, tok, modules, stop, read_documents(text, int(hparams.mom2_n_samples)),
                                       max_len=1024, dtype=dtype)
    for layer, path in missing.items():
        total, count = collected[hparams.rewrite_module_tmp.format(layer)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **{"mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                                    "mom2.count": np.array(count), "mom2.mom2": total.cpu().numpy(),
                                    "sample_size": np.array(int(hparams.mom2_n_samples))})
    return list(files.values())


@dataclasses.dataclass
class EasyEditRun:
    """EasyEdit's own per-record metric dicts and what they average to."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Optional[float]]
    edit_seconds: float
    mode: str


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _scalar(value: Any) -> float:
    return float(np.mean(value)) if isinstance(value, (list, tuple, np.ndarray)) else float(value)


def summarise_metrics(metrics: Sequence[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Means of EasyEdit's post-edit ``rewrite_acc``, ``rephrase_acc``, ``locality.*_acc`` and ``portability.*_acc``.

    A record's locality (portability) is the mean of its keys first; None when no record has one.
    """
    rewrite, rephrase, sections = [], [], {"locality": [], "portability": []}
    for record in metrics:
        post = record.get("post", {})
        if "rewrite_acc" in post:
            rewrite.append(_scalar(post["rewrite_acc"]))
        if "rephrase_acc" in post:
            rephrase.append(_scalar(post["rephrase_acc"]))
        for section, means in sections.items():
            accs = [_scalar(v) for k, v in (post.get(section) or {}).items() if k.endswith("_acc")]
            if accs:
                means.append(float(np.mean(accs)))
    return {"efficacy": _mean(rewrite), "generalization": _mean(rephrase), "specificity": _mean(sections["locality"]),
            "portability": _mean(sections["portability"])}


def editor_kwargs(records: Sequence[EditRecord], *, batch: bool, era: Optional[str]) -> dict[str, Any]:
    """:func:`~smedit_plugin.requests.to_edit_kwargs` under the names the installed editor's ``edit``/``batch_edit`` take.

    The 2023 wheel's ``batch_edit`` has no ``locality_inputs``/``portability_inputs`` parameters: it
    passes its ``locality_prompts`` and ``locality_ground_truth`` on to ``_prepare_requests`` in
    exactly those two positions, so the dicts go in under these names (the real names would reach
    ``_prepare_requests`` twice and raise). Its ``edit`` and every current-source method take the
    real names.
    """
    kwargs = to_edit_kwargs(list(records))
    if batch and era == "A":
        for ours, wheel in (("locality_inputs", "locality_prompts"), ("portability_inputs", "locality_ground_truth")):
            if ours in kwargs:
                kwargs[wheel] = kwargs.pop(ours)
    return kwargs


def run_through_editor(hparams: Any, model: torch.nn.Module, tok: Any, records: Sequence[EditRecord],
                       chunk_size: int, bar: Optional[tqdm] = None) -> EasyEditRun:
    """Edit ``records`` with ``BaseEditor`` in chunks of ``chunk_size`` that accumulate in ``model``.

    Batchable methods go through ``batch_edit``; the others through ``edit``, one record at a time
    (EasyEdit does not batch them). Records carry their locality and portability questions as
    ``locality_inputs``/``portability_inputs``, so EasyEdit's own metric dicts include both.
    ``edit_seconds`` times only the method's apply function, not EasyEdit's own before/after
    evaluation; ``bar`` advances by each chunk's edits.
    """
    from .easyedit import detect_era
    from .easyedit_editor import load_editor
    from .registry import register

    module = import_runnable_easyedit()
    register()
    batchable = module.editors.batch_editor.BatchEditor.is_batchable_method(hparams.alg_name)
    hparams = dataclasses.replace(hparams, batch_size=chunk_size if batchable else 1)
    editor = load_editor(hparams, model, tok)
    seconds = [0.0]
    apply = editor.apply_algo

    def timed_apply(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return apply(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    editor.apply_algo = timed_apply
    call = editor.batch_edit if batchable else editor.edit
    metrics: list[dict[str, Any]] = []
    for start in range(0, len(records), chunk_size):
        chunk = list(records[start:start + chunk_size])
        chunk_metrics, _, _ = call(**editor_kwargs(chunk, batch=batchable, era=detect_era()), sequential_edit=True,
                                   verbose=False)
        metrics.extend(chunk_metrics)
        if bar is not None:
            bar.update(len(chunk))
    mode = (f"batch_edit, chunks of {chunk_size}" if batchable
            else "edit, one record at a time (EasyEdit does not batch this method)")
    return EasyEditRun(metrics=metrics, summary=summarise_metrics(metrics), edit_seconds=seconds[0], mode=mode)
