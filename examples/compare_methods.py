"""Compare hypernetwork editors side by side with ``smedit_plugin.compare.run_compare`` (what ``smedit compare`` runs).

Each method (default SMEdit and MALMEN2) is trained on the same ZsRE records with its shipped
training YAML (or its archive from an earlier run with the same settings is reused), edits the same
``--n-edits`` unseen facts in one batch, and is scored with the plugin's teacher-forced ES / GS / LS.

Prints ``format_table(rows)``: one row for the unedited model and one per method, with training and
editing seconds per edit and peak memory. Writes the configuration and the rows as JSON (``--out``).

    python examples/compare_methods.py --n-edits 16 --train-records 96
    python examples/compare_methods.py --model tiny-smollm2 --train-records 8 --n-edits 4 \
        --out /tmp/compare.json                                         # seconds, random model
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from example_utils import add_model_argument, load_model

from smedit_plugin.compare import CompareConfig, format_table, run_compare
from smedit_plugin.records import sample_path
from smedit_plugin.fileio import write_json_atomic
from smedit_plugin.fileio import cache_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--methods", default="SMEdit,MALMEN2", help="comma-separated (default: %(default)s)")
    parser.add_argument("--train-data", type=Path, default=sample_path("zsre_sample"), help="ZsRE training records")
    parser.add_argument("--eval-data", type=Path, default=sample_path("zsre_sample_eval"),
                        help="ZsRE records to edit (the first --n-edits)")
    parser.add_argument("--train-records", type=int, default=None,
                        help="train on the first N records of --train-data (default: all)")
    parser.add_argument("--n-edits", type=int, default=16,
                        help="facts edited in one batch, also the training batch size (default: %(default)s)")
    parser.add_argument("--archive-root", type=Path, default=None,
                        help="where trained archives are kept and reused (default: in the smedit cache)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a matching archive exists")
    parser.add_argument("--out", type=Path, default=Path("compare_methods.json"), help="JSON result file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args()


def first_records(path: Path, n: int, folder: Path) -> Path:
    """A copy of the first ``n`` raw records of ``path`` (archives are keyed by the file's content, not its name)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    if len(records) < n:
        raise SystemExit(f"--train-records {n}: {path} has only {len(records)} records")
    subset = folder / f"first-{n}-{path.name}"
    write_json_atomic(subset, records[:n])
    return subset


def main() -> None:
    args = parse_args()
    model, tok, key = load_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        train = first_records(args.train_data, args.train_records, Path(folder)) if args.train_records else args.train_data
        config = CompareConfig(
            model=key, dataset="zsre", train_data=train, eval_data=args.eval_data,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()], protocol="batch",
            n_edits=args.n_edits, archive_root=args.archive_root or cache_dir() / "archives" / f"examples-{args.model}",
            retrain=args.retrain, progress=not args.no_progress)
        rows = run_compare(config, model=model, tok=tok)
    for row in rows:
        row["model"] = args.model
    print(f"\n{len(config.methods)} methods on {args.model}: trained on "
          f"{args.train_records or 'all'} records of {args.train_data.name}, {args.n_edits} facts edited in one batch")
    print(format_table(rows))
    write_json_atomic(args.out, {"config": {"model": args.model, "methods": config.methods, "n_edits": args.n_edits,
                                            "train_data": str(args.train_data), "train_records": args.train_records,
                                            "eval_data": str(args.eval_data)},
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
