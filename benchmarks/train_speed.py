"""Training cost of the hypernetwork methods, measured in one process so the ratios share one machine state.

Each method trains from its shipped TRAINING YAML for ``--units`` units (batches of ``--n-edits``, or
trajectories of ``--num-seq`` batches) on the same first training records, no validation, one after the
other on one loaded model; with ``--rounds 2`` (the default) the methods then run again in reverse order and
each method's fastest run counts (so a slow start or a background blip does not decide a ratio). Prints the table with every
method's s/edit relative to the first method of its protocol and writes JSON. Issue 13's targets:
SMEdit <= 0.6 x MALMEN2 (batch) and <= 0.25 x RLEdit2 (sequential). Run it on an otherwise idle machine.

    python benchmarks/train_speed.py --protocol batch --methods SMEdit MALMEN2 MALMEN1 --units 2
    python benchmarks/train_speed.py --protocol sequential --methods SMEdit RLEdit2 --n-edits 20 --num-seq 10 --units 1 --rounds 1
"""
from __future__ import annotations

import argparse
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

DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_train.json"


def train_once(model, tok, hp, records) -> dict[str, Any]:
    """One training run of ``hp``: seconds per edit as the trainer counts them, and the wall clock."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train_hypernet(model, tok, hp, records, Path(tmp) / "archive", progress=False)
        return {"train_s_per_edit": result.seconds_per_edit, "wall_s": time.perf_counter() - start,
                "edits": result.edits_seen, "optimizer_steps": result.state.optimizer_steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("batch", "sequential"), default="batch")
    parser.add_argument("--methods", nargs="+", default=["SMEdit", "MALMEN2", "MALMEN1"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n-edits", type=int, default=64)
    parser.add_argument("--num-seq", type=int, default=1)
    parser.add_argument("--units", type=int, default=2, help="batches (batch) or trajectories (sequential) per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the methods, alternating order")
    parser.add_argument("--out", type=Path, default=Path("train_speed.json"))
    args = parser.parse_args()
    if (args.protocol == "sequential") != (args.num_seq > 1):
        raise SystemExit("--protocol sequential needs --num-seq >= 2, batch needs --num-seq 1")
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    per_unit = args.n_edits * args.num_seq
    records = load_records(args.data, "zsre")[: per_unit * args.units]
    if len(records) < per_unit * args.units:
        raise SystemExit(f"{args.data} has {len(records)} records, fewer than {per_unit * args.units}")
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype)
    hps = {m: load_method_hparams(m, args.model, training=True, variant="-seq" if args.protocol == "sequential" else "").replace(
        n_edits=args.n_edits, num_seq=args.num_seq, max_steps=args.units, n_epochs=1, val_fraction=0.0,
        model_dtype=args.dtype) for m in args.methods}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    order = [m for k in range(args.rounds) for m in (args.methods if k % 2 == 0 else args.methods[::-1])]
    for method in tqdm(order, desc="training runs", unit="run"):
        runs[method].append(train_once(model, tok, hps[method], records))
        tqdm.write(f"{method}: {runs[method][-1]['train_s_per_edit']:.3f} s/edit")
    first = min(r["train_s_per_edit"] for r in runs[args.methods[0]])
    rows = []
    for method in args.methods:
        best = min(r["train_s_per_edit"] for r in runs[method])
        rows.append({"method": method, "protocol": args.protocol, "dtype": args.dtype, "threads": args.threads,
                     "n_edits": args.n_edits, "num_seq": args.num_seq, "units": args.units,
                     "train_s_per_edit": best, f"ratio_of_{args.methods[0]}": first / best, "runs": runs[method]})
    write_json_atomic(args.out, rows)
    print(format_table(["method", "train s/edit (fastest run)", "runs", f"{args.methods[0]} / method"],
                       [[r["method"], f"{r['train_s_per_edit']:.3f}",
                         " ".join(f"{x['train_s_per_edit']:.3f}" for x in r["runs"]),
                         f"{r[f'ratio_of_{args.methods[0]}']:.2f}"] for r in rows]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
