"""What each BP step of a trained hypernetwork edit does: its size and the scores after it.

For the finished batch cells of a ``smedit sweep --protocol batch`` folder, this reloads each cell's archive and
edit settings, edits the cell's facts again one BP step at a time and reports after every step the shift's size
relative to the unedited weights (``||sum of shifts so far||_F / ||W||_F``, mean and largest over the edit modules;
the step's own shift the same way) and ES / GS / LS / PS on the cell's facts. The last step's scores reproduce the
sweep's row (same archive, facts and scoring), which the table shows beside them. It answers, for example, why a
two-step method that edits well at one batch size breaks at a larger one: whether the first step already damages
the model, or the second step overshoots.

    python benchmarks/hypernet_steps.py --sweep zsre-batch --methods MALMEN2 SMEdit --sizes 128 512
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.compare.sweep import read_rows, records_by_id  # noqa: E402
from smedit_plugin.compare.sweep_cell import load_config  # noqa: E402
from smedit_plugin.evaluation import evaluate_records  # noqa: E402
from smedit_plugin.methods import method_spec  # noqa: E402
from smedit_plugin.models import load_model_for  # noqa: E402
from smedit_plugin.resolve import hparams_class  # noqa: E402
from smedit_plugin.table import format_table  # noqa: E402

METRICS = ("efficacy", "generalization", "specificity", "portability")


def relative_sizes(shifts: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean and largest ``||shift||_F / ||W||_F`` over the modules."""
    ratios = [float(shifts[n].float().norm() / weights[n].float().norm()) for n in weights]
    return sum(ratios) / len(ratios), max(ratios)


def step_through(model: Any, tok: Any, hp: Any, records: list, dataset: str, scoring: str) -> list[dict[str, Any]]:
    """Edit ``records`` with ``hp``'s archive through :func:`~smedit_plugin.hypernet.editor.apply_steps`, scoring
    after each BP step; a row per step. Needs a float32 model (low-precision models step in float32 copies of the
    weights that are only rounded back at the end). Restores the weights."""
    from smedit_plugin.hypernet.archive import load_archive
    from smedit_plugin.hypernet.editor import apply_steps

    modules = {n: model.get_submodule(n) for n in hp.edit_modules}
    wrong = sorted({str(m.weight.dtype) for m in modules.values()} - {"torch.float32"})
    if wrong:
        raise SystemExit(f"this benchmark scores between BP steps and needs a float32 model, got {', '.join(wrong)}: "
                         "load the model with model_dtype: float32")
    editor, _ = load_archive(hp.archive, model, hp)
    original = {n: m.weight.detach().clone() for n, m in modules.items()}
    rows: list[dict[str, Any]] = []
    before = original

    def after_step(step: int) -> None:
        nonlocal before
        now = {n: m.weight.detach().clone() for n, m in modules.items()}
        total_mean, total_max = relative_sizes({n: now[n] - original[n] for n in now}, original)
        step_mean, step_max = relative_sizes({n: now[n] - before[n] for n in now}, original)
        before = now
        with torch.no_grad():
            scored = evaluate_records(model, tok, records, dataset=dataset, scoring=scoring, progress=False)
        rows.append({"step": step + 1, "step_shift_mean": step_mean, "step_shift_max": step_max,
                     "total_shift_mean": total_mean, "total_shift_max": total_max, **{k: scored[k] for k in METRICS}})
        print(json.dumps(rows[-1]), flush=True)

    try:
        apply_steps(model, tok, editor, [r.prompt for r in records], [r.target_new for r in records], after_step)
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(original[n])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True, help="a batch sweep's --out folder with finished rows")
    parser.add_argument("--methods", nargs="+", default=["MALMEN2", "SMEdit"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[], help="batch sizes (default: every finished one)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("hypernet_steps.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(json.loads((args.sweep / "sweep.json").read_text()))
    if cfg.protocol != "batch":
        raise SystemExit(f"{args.sweep}: protocol {cfg.protocol!r}; this benchmark reads batch cells")
    cells = [r for r in read_rows(args.sweep) if r["method"] in args.methods and r["point"] is None
             and (not args.sizes or r["n_edits"] in args.sizes)]
    if not cells:
        raise SystemExit(f"{args.sweep / 'rows.jsonl'} has no finished row of {args.methods} at {args.sizes or 'any size'}")
    table, _, _ = records_by_id(cfg)
    model = tok = None
    results = []
    for row in cells:
        settings = dict(row["settings"]["edit"])
        archive = Path(settings["archive"])
        if not archive.is_absolute():  # written as <sweep --out>/archives/...: find it under this folder
            archive = args.sweep.joinpath(*archive.parts[archive.parts.index("archives"):])
        settings["archive"] = str(archive)
        hp = hparams_class(method_spec(row["method"]).name).from_dict(settings, source=f"{args.sweep} {row['cell']}")
        if model is None:  # the model the sweep edited, as the cell's YAML loads it
            model, tok = load_model_for(hp)
        records = [table[i] for i in row["edit_ids"]]
        steps = step_through(model, tok, hp, records, cfg.dataset, row["scoring"])
        results.append({"cell": row["cell"], "method": row["method"], "n_edits": row["n_edits"], "steps": steps,
                        "sweep_row": {k: row[k] for k in METRICS}, "unedited": row["unedited"]})
        args.out.write_text(json.dumps({"sweep": str(args.sweep), "results": results}, indent=2) + "\n")
    print(format_table(
        ["method", "facts", "after step", "step shift mean / max", "total shift mean / max", "ES", "GS", "LS", "PS"],
        [[r["method"], str(r["n_edits"]), f"{s['step']} of {len(r['steps'])}",
          f"{s['step_shift_mean']:.4f} / {s['step_shift_max']:.4f}",
          f"{s['total_shift_mean']:.4f} / {s['total_shift_max']:.4f}"]
         + [f"{100 * s[k]:.1f}" for k in METRICS] for r in results for s in r["steps"]]
        + [[r["method"], str(r["n_edits"]), "sweep row", "", ""] + [f"{100 * r['sweep_row'][k]:.1f}" for k in METRICS]
           for r in results]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
