"""Side-by-side runs of the plugin's methods on the same model, records and protocol.

Each method is trained (or its archive reused) on the same training records, edits the same
evaluation records and is scored on the final model; results come back as rows with the same
fields for every method, printed as a table and written as JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .data import EditRecord, load_records
from .evaluation import evaluate_records
from .fileio import write_json_atomic
from .hparams import HyperParamsError, load_hparams
from .models import cache_dir, load_model_and_tokenizer
from .registry import METHODS

PROTOCOLS = ("batch", "sequential", "consecutive", "single-round")
ROW_FIELDS = ("method", "model", "dataset", "protocol", "n_edits", "num_seq", "efficacy", "generalization",
              "specificity", "train_s_per_edit", "edit_s_per_edit", "peak_rss_mb")


def hparams_dir() -> Path:
    """The ``hparams/`` folder: ``$SMEDIT_HPARAMS_DIR`` or the one beside the package in a checkout."""
    env = os.environ.get("SMEDIT_HPARAMS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "hparams"
    if not path.is_dir():
        raise FileNotFoundError(f"no hparams folder at {path}; set SMEDIT_HPARAMS_DIR to the repository's hparams/")
    return path


def method_hparams(method: str, model_key: str, *, training: bool, root: Optional[Path] = None):
    """The shipped YAML of ``method`` for ``model_key`` (``-seq`` variants are picked by the caller)."""
    base = (root or hparams_dir()) / ("TRAINING" if training else "") / method / f"{model_key}.yaml"
    if not base.is_file():
        raise HyperParamsError(f"no hparams file {base} for method {method!r} and model {model_key!r}")
    return load_hparams(base)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path) and part.is_file():
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


@dataclasses.dataclass
class CompareConfig:
    model: str
    dataset: str
    train_data: Optional[Path]
    eval_data: Path
    methods: list[str]
    protocol: str = "batch"
    n_edits: int = 64
    num_seq: int = 1
    batch_size: int = 10
    archive_root: Optional[Path] = None
    retrain: bool = False
    curve_every: int = 0
    progress: bool = True


def _hypernet_row(cfg: CompareConfig, method: str, model, tok, train: Sequence[EditRecord],
                  evaluation: Sequence[EditRecord]) -> dict[str, Any]:
    from .hypernet.archive import load_archive, read_meta
    from .hypernet.workflow import edit_and_evaluate, train_hypernet

    sequential = cfg.protocol == "sequential"
    train_hp = method_hparams(method, cfg.model, training=True)
    seq_file = hparams_dir() / "TRAINING" / method / f"{cfg.model}-seq.yaml"
    if sequential and seq_file.is_file():
        train_hp = load_hparams(seq_file)
    train_hp = train_hp.replace(n_edits=cfg.n_edits, num_seq=cfg.num_seq, val_n_edits=cfg.n_edits, max_steps=-1)
    key = _fingerprint(method, cfg.model, cfg.dataset, train_hp.to_dict(), cfg.train_data)
    root = cfg.archive_root or (cache_dir() / "archives")
    archive = root / f"{method}-{cfg.model}-{cfg.dataset}-{cfg.protocol}-{key}"
    train_s_per_edit = None
    complete = (archive / "meta.json").is_file() and read_meta(archive).get("complete")
    if cfg.retrain or not complete:
        result = train_hypernet(model, tok, train_hp, train, archive, model_name=cfg.model, dataset=cfg.dataset,
                                progress=cfg.progress, resume=not cfg.retrain)
        train_s_per_edit = result.seconds_per_edit
        _mark_complete(archive, train_s_per_edit)
    else:
        train_s_per_edit = read_meta(archive).get("train_s_per_edit")
    editor, _ = load_archive(archive, model, train_hp)
    metrics = edit_and_evaluate(model, tok, editor, list(evaluation), n_edits=cfg.n_edits, dataset=cfg.dataset,
                                curve_every=cfg.curve_every, progress=cfg.progress)
    row = {"train_s_per_edit": train_s_per_edit, "edit_s_per_edit": metrics["edit_seconds"] / len(evaluation),
           "archive": str(archive), **{k: metrics[k] for k in ("efficacy", "generalization", "specificity")}}
    if "curve" in metrics:
        row["curve"] = metrics["curve"]
    return row


def _locate_row(cfg: CompareConfig, method: str, model, tok, evaluation: Sequence[EditRecord]) -> dict[str, Any]:
    """COMEBA-HK / MEMIT-C: consecutive batches that accumulate, or single rounds rolled back after each batch.

    Metrics follow the COMEBA-HK paper: reliability / generality as teacher-forced token accuracy and
    locality as agreement with the unedited model's predictions (``efficacy`` / ``generalization`` /
    ``specificity`` in the row, plus their ``average``).
    """
    from .comeba_hk.state import remove_hook_layers
    from .data import to_requests
    from .evaluation import predict_locality_reference

    hp = method_hparams(method, cfg.model, training=False).replace(batch_size=cfg.batch_size)
    apply = METHODS[method].apply_function()
    rewritten = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in rewritten}
    reference = predict_locality_reference(model, tok, list(evaluation))
    batches = [list(evaluation[i:i + cfg.batch_size]) for i in range(0, len(evaluation), cfg.batch_size)]
    refs = [reference[i:i + cfg.batch_size] for i in range(0, len(evaluation), cfg.batch_size)]

    def roll_back() -> None:
        remove_hook_layers(model)
        with torch.no_grad():
            for n, w in originals.items():
                model.get_submodule(n).weight.copy_(w)

    edit_seconds, scores = 0.0, []
    try:
        for batch, ref in zip(batches, refs):
            start = time.perf_counter()
            apply(model, tok, to_requests(batch), hp, return_orig_weights=False, keep_original_weight=False)
            edit_seconds += time.perf_counter() - start
            if cfg.protocol == "single-round":
                scores.append((len(batch), evaluate_records(model, tok, batch, dataset=cfg.dataset,
                                                            locality="agreement", reference=ref, progress=False)))
                roll_back()
        if cfg.protocol == "consecutive":
            scores.append((len(evaluation), evaluate_records(model, tok, list(evaluation), dataset=cfg.dataset,
                                                             locality="agreement", reference=reference,
                                                             progress=cfg.progress)))
    finally:
        roll_back()
    total = sum(n for n, _ in scores)
    metrics = {k: sum(n * m[k] for n, m in scores) / total for k in ("efficacy", "generalization", "specificity")}
    return {"train_s_per_edit": None, "edit_s_per_edit": edit_seconds / len(evaluation), **metrics,
            "average": sum(metrics.values()) / 3, "batch_size": cfg.batch_size}


def _mark_complete(archive: Path, train_s_per_edit: float) -> None:
    meta_path = archive / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update({"complete": True, "train_s_per_edit": train_s_per_edit})
    write_json_atomic(meta_path, meta)


def run_compare(cfg: CompareConfig, model: Optional[torch.nn.Module] = None, tok: Any = None) -> list[dict[str, Any]]:
    """Train/evaluate every method of ``cfg`` and return one row per method (plus the unedited model).

    ``model``/``tok`` replace loading ``cfg.model`` (whose name still picks the hparams files).
    """
    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in --methods; use any of {', '.join(METHODS)}")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.protocol == "batch" and cfg.num_seq != 1:
        raise ValueError("--protocol batch edits one batch: use --num-seq 1 (or --protocol sequential)")
    locate = cfg.protocol in ("consecutive", "single-round")
    for method in cfg.methods:
        if METHODS[method].needs_archive == locate:
            wanted = "batch or sequential" if METHODS[method].needs_archive else "consecutive or single-round"
            raise ValueError(f"{method} runs under the {wanted} protocol, not {cfg.protocol!r}")
    if locate:
        cfg = dataclasses.replace(cfg, num_seq=-(-cfg.n_edits // cfg.batch_size))
    if model is None:
        model, tok = load_model_and_tokenizer(cfg.model)
    train = load_records(cfg.train_data, cfg.dataset) if cfg.train_data else []
    total = cfg.n_edits if locate else cfg.n_edits * cfg.num_seq
    evaluation = load_records(cfg.eval_data, cfg.dataset)[:total]
    if len(evaluation) < total:
        raise ValueError(f"{cfg.eval_data} has {len(evaluation)} usable records, fewer than n_edits * num_seq = {total}")
    base = {"model": cfg.model, "dataset": cfg.dataset, "protocol": cfg.protocol, "n_edits": cfg.n_edits,
            "num_seq": cfg.num_seq}
    start = time.perf_counter()
    rows = []
    if locate:
        base["batch_size"] = cfg.batch_size
    else:
        unedited = evaluate_records(model, tok, list(evaluation), dataset=cfg.dataset, progress=cfg.progress)
        rows.append({"method": "unedited", **base, **{k: unedited[k] for k in ("efficacy", "generalization", "specificity")},
                     "train_s_per_edit": None, "edit_s_per_edit": 0.0, "peak_rss_mb": peak_rss_mb(),
                     "eval_seconds": time.perf_counter() - start})
    for method in cfg.methods:
        if locate:
            result = _locate_row(cfg, method, model, tok, evaluation)
        else:
            if not train:
                raise ValueError(f"{method} needs --train-data to train its hypernetwork")
            result = _hypernet_row(cfg, method, model, tok, train, evaluation)
        rows.append({"method": method, **base, **result, "peak_rss_mb": peak_rss_mb()})
        torch.manual_seed(0)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a fixed-width table with metrics in percent."""
    avg = any("average" in r for r in rows)
    head = ["method", "ES %", "GS %", "LS %"] + (["avg %"] if avg else []) + ["train s/edit", "edit s/edit", "peak RSS MB"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = []
    for r in rows:
        t = r.get("train_s_per_edit")
        lines.append([r["method"], pct(r["efficacy"]), pct(r["generalization"]), pct(r["specificity"])]
                     + ([pct(r.get("average"))] if avg else [])
                     + ["-" if t is None else f"{t:.3f}", f"{r['edit_s_per_edit']:.3f}", f"{r['peak_rss_mb']:.0f}"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One figure: efficacy, generalization and specificity against edited sequences, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r.get("curve")]
    if not curves:
        raise ValueError("no curves to plot: run the sequential protocol with --curve-every K")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for ax, metric, label in zip(axes, ("efficacy", "generalization", "specificity"),
                                 ("efficacy (ES)", "generalization (GS)", "specificity (LS)")):
        for r in curves:
            xs = [p["num_seq"] for p in r["curve"]]
            ax.plot(xs, [100 * p[metric] for p in r["curve"]], marker="o", label=r["method"])
        ax.set_title(label)
        ax.set_xlabel("edit batches applied (sequences)")
        ax.set_ylabel(f"{metric} of all facts edited so far (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    first = curves[0]
    fig.suptitle(f"{first['model']} · {first['dataset']} · {first['n_edits']} edits per batch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
