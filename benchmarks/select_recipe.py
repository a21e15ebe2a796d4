"""Choose hypernetwork settings on a validation split of the *training* records, never on evaluation records.

Each grid point trains one method from its shipped TRAINING YAML plus overrides on the first ``--n-train``
training records, of which a seeded ``--val-fraction`` is held out (``val_fraction``); validation runs after
every epoch (loss and ES/GS/LS on the held-out facts) and the point is scored by its best epoch. Prints a table
and writes JSON after every point (atomic), so a stopped sweep keeps what it measured.

    python benchmarks/select_recipe.py --points MALMEN2:lr=1e-4,meta_lr=1e-4 SMEdit:reg_coef=0.05 \
        --n-train 512 --val-fraction 0.25 --n-epochs 2 --out select.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.hparams import load_method_hparams  # noqa: E402
from smedit_plugin.records import load_records  # noqa: E402
from smedit_plugin.fileio import write_json_atomic  # noqa: E402
from smedit_plugin.hypernet.training import train_hypernet  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402
from smedit_plugin.table import format_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
METRICS = ("efficacy", "generalization", "specificity")


def parse_point(text: str) -> tuple[str, dict[str, Any]]:
    """``METHOD:field=value,field=value`` -> (method, hparams overrides); values are JSON (1e-4, true, 10)."""
    method, _, rest = text.partition(":")
    values = dict(item.split("=", 1) for item in rest.split(",") if item)
    return method, {k: json.loads(v) for k, v in values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", required=True, metavar="METHOD[:field=value,...]")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--train-data", type=Path, default=None, help="default: ../shared/data/<dataset>/*_train.json")
    parser.add_argument("--n-train", type=int, default=512, help="first N training records (validation included)")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--n-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("select_recipe.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    points = [parse_point(p) for p in args.points]
    train_data = args.train_data or DATA / args.dataset / f"{args.dataset}_train.json"
    records = load_records(train_data, args.dataset)[: args.n_train]
    model, tok = load_model_and_tokenizer(args.model)
    rows: list[dict[str, Any]] = []
    for method, overrides in points:
        hp = load_method_hparams(method, args.model, training=True).replace(
            max_steps=-1, n_epochs=args.n_epochs, val_fraction=args.val_fraction, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train_hypernet(model, tok, hp, records, Path(tmp) / "archive", dataset=args.dataset,
                                    progress=True)
            seconds = time.perf_counter() - start
        epochs = [{"unit": e["unit"], "epoch": round(e["epoch"], 3), **e["val"]}
                  for e in result.state.history if "val" in e]
        best = next(e for e in epochs if e["unit"] == result.state.best_unit)
        rows.append({"method": method, "overrides": overrides, "n_train": args.n_train,
                     "val_fraction": args.val_fraction, "n_epochs": args.n_epochs, "best_epoch": best["epoch"],
                     "val_loss": best["loss"], **{k: best[k] for k in METRICS},
                     "train_s_per_edit": result.seconds_per_edit, "seconds": seconds, "epochs": epochs})
        write_json_atomic(args.out, rows)
        print(f"{method} {overrides}: best epoch {best['epoch']:.2f} val loss {best['loss']:.4f} ES/GS/LS "
              + "/".join(f"{100 * best[k]:.1f}" for k in METRICS), flush=True)
    print(format_table(["method", "overrides", "best epoch", "val loss", "val ES", "val GS", "val LS", "s/edit"], [
        [r["method"], json.dumps(r["overrides"]), f"{r['best_epoch']:.2f}", f"{r['val_loss']:.4f}",
         *(f"{100 * r[k]:.1f}" for k in METRICS), f"{r['train_s_per_edit']:.3f}"] for r in rows], left=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
