"""What the example scripts share: choosing the model, editing through EasyEdit (or the same call directly), tables.

Each example imports this file from its own folder (Python puts a script's folder on ``sys.path``),
so copy it along with the script you copy.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from smedit_plugin import easyedit
from smedit_plugin.easyedit_editor import load_editor
from smedit_plugin.records import EditRecord, load_records
from smedit_plugin.requests import to_edit_kwargs, to_requests
from smedit_plugin.evaluation import METRICS
from smedit_plugin.fileio import cache_dir
from smedit_plugin.models import load_model_and_tokenizer
from smedit_plugin.testing import tiny_model
from smedit_plugin.resolve import apply_function
from smedit_plugin.registry import register

#: ``--model`` value for a randomly initialised SmolLM2-shaped model (real depth, width 64): seconds, not minutes.
TINY = "tiny-smollm2"
#: Short names of the metrics in printed tables.
LABELS = {"efficacy": "ES %", "generalization": "GS %", "specificity": "LS %"}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a model with YAMLs under hparams/ (default: %(default)s), or {TINY} for a tiny random "
                             "SmolLM2-shaped model that runs in seconds (used by the tests)")


def load_model(name: str) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer, hparams key)``; the tiny stand-in uses SmolLM2's YAMLs (same module names)."""
    if name == TINY:
        model, tok = tiny_model("smollm2")
        return model, tok, "smollm2-135m"
    model, tok = load_model_and_tokenizer(name)
    return model, tok, name


def load_sample(path: Path, limit: Optional[int], what: str) -> list[EditRecord]:
    """The first ``limit`` ZsRE records of ``path``; fewer than asked is an error naming the option."""
    records = load_records(path, "zsre", limit=limit)
    if limit is not None and len(records) < limit:
        raise SystemExit(f"{what}: {path} has only {len(records)} usable records, fewer than the {limit} asked for")
    return records


def default_archive(model: str, train_hp: Any, train_path: Path, n_train: int) -> Path:
    """The plugin's cache folder for these training settings (the key ``smedit compare`` and the demo use)."""
    from smedit_plugin.hypernet.training import archive_path

    return archive_path(train_hp, train_data=Path(train_path), model_key=model, dataset="zsre",
                        root=cache_dir() / "archives", label=f"example-n{n_train}")


def train_or_reuse(model: torch.nn.Module, tok: Any, train_hp: Any, train: Sequence[EditRecord], archive: Path,
                   model_name: str, *, retrain: bool, progress: bool) -> dict[str, Any]:
    """Train the hypernetworks into ``archive`` unless a completed training wrote it already; says which."""
    from smedit_plugin.hypernet.training import ensure_trained

    trained = ensure_trained(model, tok, train_hp, train, Path(archive), model_key=model_name, dataset="zsre",
                             retrain=retrain, progress=progress)
    result = trained.trained
    if result is None:
        print(f"reusing the trained {train_hp.alg_name} archive at {archive} (--retrain to train again)")
        return {"archive": str(archive), "trained_now": False}
    print(f"trained {train_hp.alg_name} on {result.edits_seen} facts ({result.state.units_done} "
          f"{'trajectories' if train_hp.num_seq > 1 else 'batches'}) in {result.train_seconds:.1f} s -> {archive}")
    return {"archive": str(archive), "trained_now": True, "train_seconds": result.train_seconds,
            "train_edits": result.edits_seen}


def easyedit_editor(hparams: Any, model: torch.nn.Module, tok: Any) -> tuple[Optional[Any], Optional[str]]:
    """``(BaseEditor or None, EasyEdit era or None)``: an editor for ``model`` if the installed EasyEdit can run here.

    The 2023 PyPI wheel (era A) hard-codes CUDA, so on a CPU-only machine ``load_editor`` refuses
    with a clear error; then the caller runs the registered apply function itself, which is exactly
    the call ``BaseEditor.batch_edit`` makes. Any other failure is a real error and is raised.
    """
    try:
        easyedit.install_transformers_shim()
        easyedit.import_easyeditor(tolerate_missing_vision=True)
    except easyedit.EasyEditImportError as exc:
        print(f"EasyEdit is not importable ({exc}).")
        print(f"-> calling the plugin's {hparams.alg_name} apply function directly, as BaseEditor would.")
        return None, None
    report = register()
    try:
        editor = load_editor(hparams, model=model, tokenizer=tok)
    except RuntimeError as exc:
        if report.era != "A":
            raise
        print(f"EasyEdit era A (PyPI wheel) cannot run its BaseEditor here: {exc}.")
        print(f"-> calling the registered {hparams.alg_name} apply function directly, exactly as "
              "BaseEditor.batch_edit does.")
        return None, report.era
    print(f"editing through EasyEdit's BaseEditor.batch_edit (era {report.era})")
    return editor, report.era


def edit(editor: Optional[Any], hparams: Any, model: torch.nn.Module, tok: Any,
         records: Sequence[EditRecord]) -> list[dict[str, Any]]:
    """Edit ``records`` in chunks of ``hparams.batch_size`` that stay in the model; EasyEdit's metric dicts.

    ``sequential_edit=True`` keeps each chunk's edit (without it, current EasyEdit restores the
    weights right after scoring; the 2023 wheel, on a GPU, ignores it and keeps edits because its
    ``keep_original_weight`` defaults to False). The direct path passes ``keep_original_weight=False``
    as that wheel's ``batch_edit`` does, so edits accumulate there too; it returns no metric dicts.
    """
    if editor is not None:
        metrics, _, _ = editor.batch_edit(**to_edit_kwargs(list(records)), sequential_edit=True, verbose=False)
        return metrics
    apply = apply_function(hparams.alg_name)
    size = hparams.batch_size
    for start in range(0, len(records), size):
        apply(model, tok, to_requests(list(records[start:start + size])), hparams, copy=False,
              return_orig_weights=True, keep_original_weight=False)
    return []


def _flat_mean(values: Iterable[Any]) -> Optional[float]:
    flat: list[float] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(float(v) for v in value)
        elif value is not None:
            flat.append(float(value))
    return sum(flat) / len(flat) if flat else None


def summarise_easyedit(metrics: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Means of EasyEdit's per-record ``rewrite_acc`` / ``rephrase_acc`` / locality ``*_acc``, pre and post edit."""
    if not metrics:
        return None
    summary: dict[str, Any] = {"n_records": len(metrics)}
    for phase in ("pre", "post"):
        parts = [m[phase] for m in metrics]
        summary[phase] = {
            "rewrite_acc": _flat_mean(p.get("rewrite_acc") for p in parts),
            "rephrase_acc": _flat_mean(p.get("rephrase_acc") for p in parts),
            "locality": _flat_mean(v for p in parts for k, v in p.get("locality", {}).items() if k.endswith("_acc")),
        }
    return summary


def easyedit_table(summary: dict[str, Any]) -> str:
    """EasyEdit's own summary as a table (locality is post-vs-pre agreement, so it exists after the edit only)."""
    rows = [(f"EasyEdit {phase}", summary[phase]) for phase in ("pre", "post")]
    return table(rows, {"rewrite_acc": "rewrite %", "rephrase_acc": "rephrase %", "locality": "locality %"})


def scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of an ``evaluate_records`` result worth printing and saving (no per-example lists)."""
    return {"n_records": metrics["n_records"], **{k: metrics[k] for k in METRICS}}


def table(rows: Sequence[tuple[str, dict[str, Any]]], columns: Optional[dict[str, str]] = None) -> str:
    """Fixed-width rows of percentages (``-`` for a missing value)."""
    columns = columns or LABELS
    width = max(len(label) for label, _ in rows)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    cells = {k: max(10, len(h)) + 2 for k, h in columns.items()}
    lines = [f"{'':<{width}}" + "".join(f"{h:>{cells[k]}}" for k, h in columns.items())]
    lines += [f"{label:<{width}}" + "".join(f"{pct(values.get(k)):>{cells[k]}}" for k in columns)
              for label, values in rows]
    return "\n".join(lines)
