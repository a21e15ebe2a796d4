"""``smedit compare`` output: the results table, the general-capability table and the plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..table import format_table as layout
from .config import METRIC_NAMES

#: Column label of each metric in tables and plots.
METRIC_LABELS = {"efficacy": "ES", "generalization": "GS", "specificity": "LS", "portability": "PS"}


def shown_metrics(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """ES, GS, LS, and PS when any row (or any point of a curve) has a portability score."""
    points = list(rows) + [p for r in rows for p in r.get("curve", ())]
    has_ps = any(p.get("portability") is not None for p in points)
    return METRIC_NAMES if has_ps else tuple(m for m in METRIC_NAMES if m != "portability")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a fixed-width table with metrics in percent; EasyEdit's own metrics and errors follow it.

    The PS column appears when the records have portability questions.
    """
    metrics = shown_metrics(rows)
    avg = any("average" in r for r in rows)
    ee = any("easyedit" in r for r in rows)
    labels = [METRIC_LABELS[m] for m in metrics]
    head = (["method"] + [f"{label} %" for label in labels] + (["avg %"] if avg else [])
            + ([f"EasyEdit {'/'.join(labels)} %"] if ee else []) + ["train s/edit", "edit s/edit", "peak RSS MB"])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    secs = lambda v: "-" if v is None else f"{v:.3f}"
    lines = []
    for r in rows:
        theirs = r.get("easyedit")
        lines.append([r["method"]] + [pct(r.get(m)) for m in metrics]
                     + ([pct(r.get("average"))] if avg else [])
                     + (["/".join(pct(theirs.get(m)) for m in metrics) if theirs else "-"] if ee else [])
                     + [secs(r.get("train_s_per_edit")), secs(r.get("edit_s_per_edit")), f"{r['peak_rss_mb']:.0f}"])
    notes = [f"{r['method']}: {r[key]}" for r in rows for key in ("error", "easyedit_error") if r.get(key)]
    notes += [f"{r['method']}: EasyEdit ran it with {r['easyedit_mode']}" for r in rows if r.get("easyedit_mode")]
    return "\n".join([layout(head, lines)] + notes)


def format_general(rows: Sequence[dict[str, Any]]) -> str:
    """General capability (GLUE-style accuracy %, perplexity) of the unedited model and after each probed batch."""
    points = [(r["method"], p) for r in rows for p in r.get("general", [])]
    if not points:
        return ""
    tasks = list(points[0][1]["glue"])
    head = ["method", "after batches"] + [t.upper() + " %" for t in tasks] + ["perplexity"]
    lines = [[m, str(p["num_seq"])] + [f"{100 * p['glue'][t]:.1f}" for t in tasks]
             + ["-" if p["perplexity"] is None else f"{p['perplexity']:.2f}"] for m, p in points]
    return layout(head, lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The run as one PNG: curves when rows carry them (``--curve-every``), else bars per method and metric."""
    if any(r.get("curve") for r in rows):
        return plot_curves(rows, path)
    plt = _pyplot()

    scored = [r for r in rows if r.get("efficacy") is not None]
    if not scored:
        raise ValueError("no scored rows to plot")
    metrics = shown_metrics(scored)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(scored) + 2), 4))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(scored))]
        ax.bar(xs, [100 * (r[metric] or 0.0) for r in scored], width, label=f"{metric} ({METRIC_LABELS[metric]})")
    ax.set_xticks(range(len(scored)), [r["method"] for r in scored], rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    first = scored[0]
    ax.set_title(f"{first['model']} · {first['dataset']} · {first['protocol']} · {first['n_edits']} edits"
                 f"{' × ' + str(first['num_seq']) if first['protocol'] == 'sequential' else ''}")
    return _save(plt, fig, path)


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One figure: each metric (PS too when the records have it) against edited sequences, a line per method."""
    plt = _pyplot()

    curves = [r for r in rows if r.get("curve")]
    if not curves:
        raise ValueError("no curves to plot: run the sequential protocol with --curve-every K")
    metrics = shown_metrics(curves)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 4), sharex=True)
    for ax, metric in zip(axes, metrics):
        for r in curves:
            points = [p for p in r["curve"] if p.get(metric) is not None]
            ax.plot([p["num_seq"] for p in points], [100 * p[metric] for p in points], marker="o", label=r["method"])
        ax.set_title(f"{metric} ({METRIC_LABELS[metric]})")
        ax.set_xlabel("edit batches applied (sequences)")
        ax.set_ylabel(f"{metric} of all facts edited so far (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    first = curves[0]
    fig.suptitle(f"{first['model']} · {first['dataset']} · {first['n_edits']} edits per batch")
    return _save(plt, fig, path)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported late: only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix, then free it."""
    from ..fileio import atomic_path

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
