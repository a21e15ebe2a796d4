"""``smedit compare``: several methods on the same model, records and protocol, side by side."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..methods import COMPARE_DEFAULT
from ..protocols import PROTOCOLS
from .base import Runner


def _edit_counts(text: str) -> tuple[int, ...]:
    """``"200,400"`` -> ``(200, 400)``."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected edit counts like 200,400,600, got {text!r}") from None

def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--train-data", type=Path, default=None)
    parser.add_argument("--eval-data", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(COMPARE_DEFAULT),
                        help="comma-separated: plugin methods and easyedit:<METHOD> for EasyEdit's own (e.g. easyedit:FT); "
                             "METHOD[field=value,...] runs a variant with hparams overrides (e.g. "
                             f"{COMPARE_DEFAULT[0]}[reg_coef=0])")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="batch",
                        help="; ".join(f"{p.name}: {p.help}" for p in PROTOCOLS.values()))
    by_chunk = lambda option: ", ".join(p.name for p in PROTOCOLS.values() if p.chunk_option == option)
    parser.add_argument("--n-edits", type=int, default=64,
                        help=f"facts per edit batch ({by_chunk('n_edits')}); facts in all ({by_chunk('batch_size')})")
    parser.add_argument("--batch-size", type=int, default=10,
                        help=f"facts per step ({by_chunk('batch_size')}; default: %(default)s)")
    parser.add_argument("--num-seq", type=int, default=1,
                        help=f"edit batches that accumulate ({by_chunk('n_edits')}; default: %(default)s)")
    parser.add_argument("--archives", type=Path, default=None, help="where trained archives are kept (default: cache)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="also re-score all facts edited so far after every K edit batches (accumulating protocols)")
    parser.add_argument("--checkpoints", type=_edit_counts, default=(),
                        help="also re-score all facts edited so far when this many have been edited, e.g. "
                             "200,400,600,800 (accumulating protocols; the end is always scored)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a PNG: curves with --curve-every, otherwise bars per method and metric")
    parser.add_argument("--easyedit-hparams", type=Path, default=None,
                        help="folder of EasyEdit YAMLs (METHOD/MODEL.yaml) for easyedit:<METHOD> entries "
                             "(default: the plugin's hparams/EASYEDIT)")
    parser.add_argument("--via-easyedit", action="store_true",
                        help="also run the plugin's methods end to end through EasyEdit's BaseEditor")
    parser.add_argument("--general-every", type=int, default=0,
                        help="general capability (GLUE-style accuracy, perplexity) before editing and after every K "
                             "edit batches and the last one (0 = off)")
    parser.add_argument("--general-items", type=int, default=100, help="items per GLUE-style task (default: %(default)s)")
    parser.add_argument("--general-tokens", type=int, default=4096,
                        help="WikiText-2 tokens for perplexity (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("compare_results.json"))
    parser.add_argument("--no-progress", action="store_true")
    return run_compare_command


def run_compare_command(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets, write_json_atomic

    check_output_targets(files={"--out": args.out, "--plot": args.plot}, folders={"--archives": args.archives})
    from ..compare import CompareConfig, format_general, format_table, parse_methods, plot_results, run_compare

    cfg = CompareConfig(model=args.model, dataset=args.dataset, train_data=args.train_data, eval_data=args.eval_data,
                        methods=parse_methods(args.methods), protocol=args.protocol,
                        n_edits=args.n_edits, num_seq=args.num_seq, batch_size=args.batch_size,
                        archive_root=args.archives, retrain=args.retrain,
                        curve_every=args.curve_every, checkpoints=args.checkpoints, progress=not args.no_progress,
                        easyedit_hparams=args.easyedit_hparams, via_easyedit=args.via_easyedit,
                        general_every=args.general_every, general_items=args.general_items,
                        general_tokens=args.general_tokens)
    rows = run_compare(cfg)
    if not rows:  # a data-parallel rank other than 0: it helped train, rank 0 reports
        return 0
    print(format_table(rows))
    if cfg.general_every:
        print("\ngeneral capability\n" + format_general(rows))
    write_json_atomic(args.out, rows)
    print(f"wrote {args.out}")
    if args.plot is not None:
        print(f"wrote {plot_results(rows, args.plot)}")
    return 0
