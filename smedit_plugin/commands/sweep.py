"""``smedit sweep``: a grid of methods x edit counts x seeds, resumable cell by cell (:mod:`smedit_plugin.compare.sweep`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..protocols import PROTOCOLS
from .base import Runner


def _ints(text: str) -> tuple[int, ...]:
    """``"1024,2048"`` -> ``(1024, 2048)`` (order kept, repeats dropped)."""
    try:
        return tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers like 1024,2048, got {text!r}") from None


def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--train-data", type=Path, default=None,
                        help="training records (methods that train use what is not held out as edit targets)")
    parser.add_argument("--eval-data", type=Path, required=True,
                        help="edit targets first come from here (then from records held out of --train-data)")
    parser.add_argument("--methods", required=True, help="as in smedit compare (plugin methods, easyedit:<METHOD>)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="batch")
    parser.add_argument("--n-edits", type=_ints, default=(64,), help="comma list (default: %(default)s)")
    parser.add_argument("--num-seq", type=_ints, default=(1,), help="comma list (default: %(default)s)")
    parser.add_argument("--batch-size", type=_ints, default=(10,), help="comma list (default: %(default)s)")
    parser.add_argument("--seeds", type=_ints, default=(0,),
                        help="comma list: each seed draws other edit targets and trains with that seed (default: 0)")
    parser.add_argument("--checkpoints", type=_ints, default=(),
                        help="also score (and save a resumable state) when this many facts have been edited")
    parser.add_argument("--curve-every", type=int, default=0, help="also score every K edit batches")
    parser.add_argument("--score-sample", type=int, default=0,
                        help="score a seeded sample of this many edited facts (at least 1000 recommended); 0 = all")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the records held out of --train-data")
    parser.add_argument("--edit-pool", type=int, default=None,
                        help="size the split for this many edit targets (default: the largest cell), so sweeps of "
                             "other cells into their own --out share one split and the same training records")
    parser.add_argument("--train-records", type=int, default=None,
                        help="training records per cell (default: all that are left; when its edits accumulate over "
                             "several batches, as many as it edits plus the validation share, as in RLEdit)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="facts per training batch (default: the cell's edit batch, as the papers train)")
    parser.add_argument("--state-every", type=int, default=0,
                        help="save the edits every K batches so a killed cell continues from there (default: only "
                             "at checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="sweep folder: rows.jsonl, split.json, archives, states")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--easyedit-hparams", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true")
    return run_sweep_command


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets, write_json_atomic

    check_output_targets(files={"--plot": args.plot}, folders={"--out": args.out})
    from ..compare.config import parse_methods
    from ..compare.report import format_sweep, plot_sweep
    from ..compare.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(model=args.model, dataset=args.dataset, train_data=args.train_data, eval_data=args.eval_data,
                      methods=tuple(parse_methods(args.methods)), out=args.out, protocol=args.protocol,
                      n_edits=args.n_edits, num_seq=args.num_seq, batch_size=args.batch_size, seeds=args.seeds,
                      checkpoints=args.checkpoints, curve_every=args.curve_every, score_sample=args.score_sample,
                      split_seed=args.split_seed, train_records=args.train_records, train_batch=args.train_batch,
                      edit_pool=args.edit_pool,
                      state_every=args.state_every, retrain=args.retrain, resume=args.resume,
                      progress=not args.no_progress, easyedit_hparams=args.easyedit_hparams)
    rows = run_sweep(cfg)
    print(format_sweep(rows))
    write_json_atomic(args.out / "rows.json", rows)
    print(f"wrote {args.out / 'rows.json'}")
    if args.plot is not None:
        print(f"wrote {plot_sweep(rows, args.plot)}")
    return 0
