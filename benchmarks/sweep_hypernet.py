"""Training-amount / BP-step / regulariser trends of the hypernetwork methods (the SMEdit paper's Figures 2-3 protocol).

Each grid point trains one method on the first ``n_train`` ZsRE training records (one pass, batches of
``--n-edits``), batch-edits the same ``--n-edits`` evaluation facts and scores them (ES/GS/LS as
``smedit compare --protocol batch``). Overrides apply to the shipped TRAINING YAML of the method, so
the defaults stay the paper's. Prints a table and writes JSON after every point (atomic), so a long
sweep that is stopped keeps what it measured.

    python benchmarks/sweep_hypernet.py --points SMEdit:n_train=256 SMEdit:n_train=256,reg_coef=0.05 \
        MALMEN2:n_train=256 --out sweep.json
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
from smedit_plugin.evaluation import evaluate_records  # noqa: E402
from smedit_plugin.fileio import write_json_atomic  # noqa: E402
from smedit_plugin.hypernet.archive import load_archive  # noqa: E402
from smedit_plugin.hypernet.training import edit_and_score, train_hypernet  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre"


def parse_point(text: str) -> tuple[str, int, dict[str, Any]]:
    """``METHOD:n_train=256,reg_coef=0.05,bp_steps=3`` -> (method, n_train, hparams overrides)."""
    method, _, rest = text.partition(":")
    values = dict(item.split("=", 1) for item in rest.split(",") if item)
    if "n_train" not in values:
        raise SystemExit(f"--points {text!r}: give n_train=N")
    n_train = int(values.pop("n_train"))
    return method, n_train, {k: json.loads(v) for k, v in values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", required=True, metavar="METHOD:n_train=N[,field=value...]")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-data", type=Path, default=DATA / "zsre_train.json")
    parser.add_argument("--eval-data", type=Path, default=DATA / "zsre_eval.json")
    parser.add_argument("--n-edits", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("sweep_hypernet.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    points = [parse_point(p) for p in args.points]
    model, tok = load_model_and_tokenizer(args.model)
    train_all = load_records(args.train_data, "zsre")
    evaluation = load_records(args.eval_data, "zsre")[: args.n_edits]
    base = evaluate_records(model, tok, evaluation, dataset="zsre", progress=False)
    rows: list[dict[str, Any]] = [{"method": "unedited", **{k: base[k] for k in ("efficacy", "generalization", "specificity")}}]
    for method, n_train, overrides in points:
        hp = load_method_hparams(method, args.model, training=True).replace(
            n_edits=args.n_edits, num_seq=1, val_n_edits=args.n_edits, max_steps=-1, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train_hypernet(model, tok, hp, train_all[:n_train], Path(tmp) / "archive", progress=True)
            seconds = time.perf_counter() - start
            editor, _ = load_archive(Path(tmp) / "archive", model, hp)
            m = edit_and_score(model, tok, editor, evaluation, n_edits=args.n_edits, dataset="zsre")
        rows.append({"method": method, "n_train": n_train, **overrides,
                     **{k: m[k] for k in ("efficacy", "generalization", "specificity")},
                     "train_s_per_edit": result.seconds_per_edit, "train_seconds": seconds})
        write_json_atomic(args.out, rows)
        print(f"{method:8s} n_train={n_train:<5d} {overrides}  ES/GS/LS "
              + "/".join(f"{100 * m[k]:.1f}" for k in ("efficacy", "generalization", "specificity"))
              + f"  train {result.seconds_per_edit:.3f} s/edit", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
