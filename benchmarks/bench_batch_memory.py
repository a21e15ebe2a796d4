"""Peak memory of one hypernetwork batch edit and one training unit as the batch grows (issue 27.4).

Every (mode, method, batch size) runs in its own process, so each peak is its own: the worker loads the
model, resets the kernel's high-water mark (``/proc/self/clear_refs``) and then runs either one batch edit
of ``n`` CounterFact facts with the method's edit YAML and an untrained editor (the memory of an edit does
not depend on what the networks learned), or one training unit (``max_steps: 1``) with a meta-batch of
``n`` facts from the TRAINING YAML. Prints a table of the peak RSS, the RSS before the operation, the
growth, the seconds and the peak relative to the smallest batch, and writes JSON. Issue 27's target:
peak at 2^13 at most 2x the peak at 2^10, for editing and training.

    python benchmarks/bench_batch_memory.py --modes edit train --methods SMEdit MALMEN2 --sizes 1024 2048 4096 8192

``--sequences K`` instead runs one process of K consecutive edits of ``--n-edits`` facts each (edits
accumulate, as sequential editing does) and reports each edit's own peak and the RSS after it (flat memory).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.compare.config import parse_overrides  # noqa: E402
from smedit_plugin.memory import reset_peak, status_mb  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train.json"


def _reset_peak() -> float:
    """Reset the high-water mark to the current RSS and return that RSS (MB)."""
    import gc

    gc.collect()
    if not reset_peak():
        raise RuntimeError("this benchmark needs Linux's /proc/self/clear_refs to measure each peak")
    return status_mb("VmRSS")


def _setup(args: argparse.Namespace, n: int, training: bool) -> tuple[Any, Any, Any, list]:
    import torch

    from smedit_plugin.hparams import load_method_hparams
    from smedit_plugin.models import load_model_for
    from smedit_plugin.records import load_records

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hp = load_method_hparams(args.method, args.model, training=training)
    changes: dict[str, Any] = dict(args.set)
    if training:
        changes.update(n_edits=n, max_steps=1, n_epochs=1, val_fraction=0.0)
    hp = hp.replace(**changes) if changes else hp
    records = load_records(args.data, "counterfact", limit=n)
    if len(records) < n:
        raise SystemExit(f"{args.data} has {len(records)} usable records, {n} needed")
    model, tok = load_model_for(hp, args.model)
    return hp, model, tok, records


def worker(args: argparse.Namespace) -> dict:
    """One edit or one training unit of ``args.n`` facts in this process; its peak RSS and seconds."""
    from smedit_plugin.hypernet.editor import HypernetEditor, edit_batch, hypernet_device
    from smedit_plugin.hypernet.trainer import MetaTrainer

    n = args.n
    hp, model, tok, records = _setup(args, n, training=args.mode == "train")
    if args.mode == "edit":
        editor = HypernetEditor(model, hp, device=hypernet_device(hp))
        before = _reset_peak()
        start = time.perf_counter()
        edit_batch(model, tok, editor, [r.prompt for r in records], [r.target_new for r in records])
    else:
        trainer = MetaTrainer(model, tok, hp)
        before = _reset_peak()
        start = time.perf_counter()
        trainer.train(records, progress=False)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"mode": args.mode, "method": args.method, "n": n, "rss_before_mb": before, "peak_rss_mb": peak,
            "growth_mb": peak - before, "seconds": seconds, "threads": args.threads, "set": dict(args.set)}


def sequences_worker(args: argparse.Namespace) -> dict:
    """``args.sequences`` consecutive edits of ``args.n_edits`` facts that accumulate; per-edit peak and RSS after."""
    from smedit_plugin.hypernet.editor import HypernetEditor, edit_batch, hypernet_device

    n = args.n_edits
    hp, model, tok, records = _setup(args, n * args.sequences, training=False)
    editor = HypernetEditor(model, hp, device=hypernet_device(hp))
    rows, snapshot = [], None
    for index in range(args.sequences):
        batch = records[index * n:(index + 1) * n]
        _reset_peak()
        start = time.perf_counter()
        snapshot = edit_batch(model, tok, editor, [r.prompt for r in batch], [r.target_new for r in batch], snapshot)
        rows.append({"sequence": index + 1, "seconds": time.perf_counter() - start,
                     "peak_rss_mb": status_mb("VmHWM"), "rss_after_mb": status_mb("VmRSS")})
        print(json.dumps(rows[-1]), flush=True)
    return {"mode": "sequences", "method": args.method, "n_edits": n, "rows": rows, "threads": args.threads}


def _print_table(rows: list[dict]) -> None:
    from smedit_plugin.table import format_table

    base = {}
    for r in rows:
        base.setdefault((r["mode"], r["method"]), r["peak_rss_mb"])
    table = [[r["mode"], r["method"], str(r["n"]), f"{r['rss_before_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
              f"{r['growth_mb']:.0f}", f"{r['seconds']:.1f}", f"{r['peak_rss_mb'] / base[(r['mode'], r['method'])]:.2f}"]
             for r in rows]
    print(format_table(["mode", "method", "facts", "RSS before MB", "peak RSS MB", "growth MB", "seconds",
                        "peak / first"], table, left=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--modes", nargs="+", choices=("edit", "train"), default=["edit", "train"])
    parser.add_argument("--methods", nargs="+", default=["SMEdit", "MALMEN2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="hparams overrides for every run (e.g. micro_batch_size=16 cache_memory_mb=512)")
    parser.add_argument("--sequences", type=int, default=0, help="consecutive edits in one process (0 = the size table)")
    parser.add_argument("--n-edits", type=int, default=20, help="facts per edit with --sequences")
    parser.add_argument("--out", type=Path, default=Path("bench_batch_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="edit", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="SMEdit", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.set = list(parse_overrides(args.set).items())
    if args.sequences:
        args.method = args.methods[0]
        result = sequences_worker(args)
        peaks = [r["peak_rss_mb"] for r in result["rows"]]
        print(f"peak RSS per edit: first {peaks[0]:.0f} MB, max {max(peaks):.0f} MB, last {peaks[-1]:.0f} MB; "
              f"RSS after: first {result['rows'][0]['rss_after_mb']:.0f} MB, last {result['rows'][-1]['rss_after_mb']:.0f} MB")
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    rows = []
    sets = [f"{k}={json.dumps(v)}" for k, v in args.set]
    for mode in args.modes:
        for method in args.methods:
            for n in args.sizes:
                cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--method", method, "--n", str(n),
                       "--model", args.model, "--data", str(args.data), "--threads", str(args.threads)]
                if sets:
                    cmd += ["--set", *sets]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
                args.out.write_text(json.dumps(rows, indent=2) + "\n")
    _print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
