"""``smedit compare`` output: the results table, the general-capability table and the plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..table import format_table as layout
from .config import METRIC_NAMES

#: Column label of each metric in tables and plots.
METRIC_LABELS = {"efficacy": "ES", "generalization": "GS", "specificity": "LS", "portability": "PS", "average": "avg"}


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


def _shape(row: dict[str, Any]) -> str:
    """A sweep cell's size: ``1024``, ``20x100`` (chunks of 20, 100 of them), ``1000 in 10s``."""
    if row["protocol"] in ("batch",) or row["total"] == row["chunk"]:
        return str(row["total"])
    if row["n_edits"] == row["chunk"]:
        return f"{row['chunk']}x{row['total'] // row['chunk']}"
    return f"{row['total']} in {row['chunk']}s"


def _line(row: dict[str, Any], sizes: set[int]) -> str:
    """A sweep plot's line: the method, and its round size when the sweep varies it."""
    return row["method"] + (f" (rounds of {row['chunk']})" if len(sizes) > 1 else "")


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """The finished cells of a sweep, one line each, metrics in percent (the unedited model's LS beside them)."""
    final = sorted((r for r in rows if r.get("point") is None), key=lambda r: (r["method"], r["total"], r["seed"]))
    if not final:
        return "no finished cells"
    metrics = shown_metrics(final)
    avg = any("average" in r for r in final)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    secs = lambda v: "-" if v is None else f"{v:.3f}"
    head = (["method", "edits", "seed"] + [f"{METRIC_LABELS[m]} %" for m in metrics] + (["avg %"] if avg else [])
            + ["unedited LS %", "train s/edit", "edit s/edit", "peak MB", "train peak MB"])
    lines = [[r["method"], _shape(r), str(r["seed"])] + [pct(r.get(m)) for m in metrics]
             + ([pct(r.get("average"))] if avg else [])
             + [pct(r["unedited"]["specificity"]), secs(r.get("train_s_per_edit")), secs(r.get("edit_s_per_edit")),
                f"{r['peak_rss_mb']:.0f}", "-" if r.get("train_peak_rss_mb") is None else f"{r['train_peak_rss_mb']:.0f}"]
             for r in final]
    notes = [f"{r['method']}: {r['error']}" for r in final if r.get("error")]
    return "\n".join([layout(head, lines, left=3)] + notes)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each metric (and the seconds per edit) against the number of facts edited, a line per method (mean over
    seeds, the range as a band). Checkpoint rows give the curve of one run; final rows the cells of the grid."""
    plt = _pyplot()

    final = [r for r in rows if r.get("point") is None and r.get("efficacy") is not None]
    if not final:
        raise ValueError("no finished cells to plot")
    metrics = list(shown_metrics(final)) + (["average"] if any("average" in r for r in final) else [])
    panels = metrics + ["train_s_per_edit", "edit_s_per_edit"]
    sizes = {r["chunk"] for r in final}
    points = [r for r in rows if r.get("point") is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, key in zip(axes, panels):
        lines: dict[str, dict[int, list[float]]] = {}
        for r in final + (points if key in metrics else []):
            x = r["point"] if r.get("point") is not None else r["total"]
            value = r.get(key)
            if value is not None:
                lines.setdefault(_line(r, sizes), {}).setdefault(x, []).append(value * (100 if key in metrics else 1))
        for label, by_x in sorted(lines.items()):
            xs = sorted(by_x)
            means = [sum(by_x[x]) / len(by_x[x]) for x in xs]
            ax.plot(xs, means, marker="o", label=label)
            if any(len(by_x[x]) > 1 for x in xs):
                ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_title(METRIC_LABELS.get(key, key.replace("_", " ")))
        ax.set_xlabel("facts edited")
        ax.set_ylabel("%" if key in metrics else "seconds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    first = final[0]
    fig.suptitle(f"{first['model']} · {first['dataset']} · {first['protocol']}")
    return _save(plt, fig, path)
