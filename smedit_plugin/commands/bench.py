"""``smedit bench``: speed and memory of batch editing with the hypernetwork methods.

Prints a table and writes JSON. Targets (e.g. 512 facts on SmolLM2 under 6 GB peak RSS, with
``--data`` pointing at EasyEdit's ``zsre_mend_eval.json``) are read from the output, never asserted
in unit tests.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .base import Runner
from ..methods import COMPARE_DEFAULT


def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(COMPARE_DEFAULT))
    parser.add_argument("--n-edits", type=int, default=256, help="facts edited in one batch (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="ZsRE records, e.g. EasyEdit's zsre_mend_eval.json (default: the packaged 300-record sample)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="a trained archive for the first method; otherwise an untrained network of the same shape "
                             "(speed and memory do not depend on training)")
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    return run_bench


def run_bench(args: argparse.Namespace) -> int:
    from ..compare import method_hparams, peak_rss_mb
    from ..records import load_records, sample_path
    from ..fileio import write_json_atomic
    from ..hypernet.editor import edit_batch
    from ..hypernet.archive import load_archive
    from ..hypernet.editor import HypernetEditor
    from ..models import load_model_and_tokenizer
    from ..table import format_table

    data = args.data or sample_path("zsre_sample")
    records = load_records(data, "zsre")[: args.n_edits]
    if len(records) < args.n_edits:
        raise ValueError(f"--data {data} has only {len(records)} records; lower --n-edits or pass a larger file")
    model, tok = load_model_and_tokenizer(args.model)
    rows = []
    for i, method in enumerate(m.strip() for m in args.methods.split(",") if m.strip()):
        hp = method_hparams(method, args.model, training=False)
        editor = (load_archive(args.archive, model, hp)[0] if args.archive and i == 0
                  else HypernetEditor(model, hp, num_seq=1))
        start = time.perf_counter()
        snapshot = edit_batch(model, tok, editor, [r.prompt for r in records], [r.target_new for r in records])
        seconds = time.perf_counter() - start
        snapshot.restore()
        rows.append({"method": method, "model": args.model, "n_edits": len(records), "bp_steps": hp.bp_steps,
                     "edit_seconds": seconds, "edit_s_per_edit": seconds / len(records), "peak_rss_mb": peak_rss_mb()})
    print(format_table(["method", "n_edits", "bp_steps", "edit s", "s/edit", "peak RSS MB"],
                       [[r["method"], str(r["n_edits"]), str(r["bp_steps"]), f"{r['edit_seconds']:.1f}",
                         f"{r['edit_s_per_edit']:.4f}", f"{r['peak_rss_mb']:.0f}"] for r in rows]))
    write_json_atomic(args.out, rows)
    print(f"wrote {args.out}")
    return 0
