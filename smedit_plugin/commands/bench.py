"""``smedit bench``: speed and memory of batch editing with the hypernetwork methods.

Prints a table and writes JSON. Targets (e.g. 512 facts on SmolLM2 under 6 GB peak RSS, with
``--data`` pointing at EasyEdit's ``zsre_mend_eval.json``) are read from the output, never asserted
in unit tests.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

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


def bench_hparams(methods: str, model_key: str) -> list[Any]:
    """The shipped editing hparams of each ``--methods`` entry; anything but a hypernetwork method is refused."""
    from ..hparams import load_method_hparams
    from ..methods import HYPERNET_FAMILY, METHODS, canonical_alg_name, methods_of_family

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError("--methods is empty; name at least one hypernetwork method")
    hypernet = methods_of_family(HYPERNET_FAMILY)
    chosen = []
    for name in names:
        method = name if name in METHODS else canonical_alg_name(name)
        if method not in hypernet:
            raise ValueError(f"--methods {name}: smedit bench measures one batch edit of a hypernetwork method "
                             f"({', '.join(hypernet)}); {method} is not one (measure it with smedit compare, e.g. "
                             "--protocol consecutive, or the scripts in benchmarks/)")
        chosen.append(load_method_hparams(method, model_key))
    return chosen


def run_bench(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets, write_json_atomic

    check_output_targets(files={"--out": args.out})
    from ..compare import peak_rss_mb
    from ..hypernet.archive import load_archive
    from ..hypernet.editor import HypernetEditor, edit_batch
    from ..models import load_model_for
    from ..records import load_records, sample_path
    from ..table import format_table

    chosen = bench_hparams(args.methods, args.model)
    data = args.data or sample_path("zsre_sample")
    records = load_records(data, "zsre")[: args.n_edits]
    if len(records) < args.n_edits:
        raise ValueError(f"--data {data} has only {len(records)} records; lower --n-edits or pass a larger file")
    model, tok = load_model_for(chosen[0])  # the YAML's model_name and model_dtype (a large model in bf16)
    rows = []
    for i, hp in enumerate(chosen):
        method = hp.alg_name
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
