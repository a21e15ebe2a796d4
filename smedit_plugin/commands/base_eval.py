"""``smedit base-eval``: metrics of the unedited model on ZsRE or CounterFact records."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .base import Runner


def format_metrics_table(metrics: dict, title: str) -> str:
    """A small fixed-width table of efficacy / generalization / specificity / portability in percent."""
    from ..evaluation import METRICS
    from ..table import format_table

    return title + "\n" + format_table(["metric", "value"], [
        [name, "n/a" if metrics[name] is None else f"{100 * metrics[name]:.1f} %"] for name in METRICS])


def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, gemma-3-270m, or a Hugging Face path/id (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="ZsRE or CounterFact JSON file (default: the packaged 64-record ZsRE eval sample)")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default=None,
                        help="file schema; detected from the first record when omitted")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics and per-record scores to this JSON file")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if present, else CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return run_base_eval


def run_base_eval(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets, write_json_atomic

    check_output_targets(files={"--out": args.out})
    from .._version import __version__
    from ..records import detect_dataset, load_records, sample_path
    from ..evaluation import evaluate_records
    from ..models import load_model_and_tokenizer

    data = Path(args.data) if args.data else sample_path("zsre_sample_eval")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    dataset = args.dataset or detect_dataset(data)
    records = load_records(data, dataset, limit=args.limit)
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_records(model, tok, records, dataset=dataset, batch_size=args.batch_size,
                               progress=not args.no_progress)
    eval_seconds = time.perf_counter() - start
    print(format_metrics_table(metrics, f"{args.model} (unedited) on {len(records)} {dataset} records from {data}"))
    if args.out is not None:
        import torch
        import transformers

        write_json_atomic(args.out, {
            "command": "base-eval",
            "model": args.model,
            "data": str(data),
            "dataset": dataset,
            "limit": args.limit,
            "load_seconds": round(load_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "versions": {"smedit_plugin": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            **metrics,
        })
        print(f"wrote {args.out}")
    return 0
