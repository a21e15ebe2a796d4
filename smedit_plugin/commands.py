"""``smedit train`` and ``smedit compare`` (registered in :data:`smedit_plugin.cli.COMMANDS`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import Runner
from .methods import COMPARE_DEFAULT, method_names

# --------------------------------------------------------------------------------------------
# smedit train
# --------------------------------------------------------------------------------------------


def setup_train(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("hparams", help="a TRAINING yaml (hparams/TRAINING/<METHOD>/<model>.yaml) or its shipped name TRAINING/<METHOD>/<model>")
    parser.add_argument("--data", required=True, help="training records (ZsRE or CounterFact JSON)")
    parser.add_argument("--val-data", default=None,
                        help="validation records: loss and ES/GS/LS after every epoch, the archive keeps the best")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="override val_fraction: hold out this share of --data as the validation split")
    parser.add_argument("--n-epochs", type=int, default=None, help="override n_epochs (passes over --data)")
    parser.add_argument("--out", required=True, type=Path,
                        help="archive directory to write (resumed if it holds an archive of this run; any other "
                             "existing file or non-empty folder is refused unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace whatever --out holds (a file, a folder's contents, another run's archive)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override max_steps: training batches or sequences, -1 = one full pass")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default=None)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    return run_train


def run_train(args: argparse.Namespace) -> int:
    from .records import detect_dataset, load_records
    from .hparams import load_hparams
    from .hypernet.distributed import init_from_environment, launched_world, shutdown
    from .hypernet.hparams import HypernetHyperParams
    from .hypernet.runner import check_out_dir, train_hypernet
    from .models import load_model_for

    if args.max_steps is not None and (args.max_steps == 0 or args.max_steps < -1):
        raise ValueError(f"--max-steps must be a positive number of training units, or -1 for one full pass; "
                         f"got {args.max_steps}")
    hp = load_hparams(args.hparams)
    if not isinstance(hp, HypernetHyperParams):
        raise ValueError(f"{args.hparams}: {hp.alg_name} has no hypernetwork to train")
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("val_fraction", args.val_fraction),
                                   ("n_epochs", args.n_epochs)) if v is not None}
    if args.val_data and args.val_fraction:
        raise ValueError("give --val-data or --val-fraction, not both")
    if overrides:
        hp = hp.replace(**overrides)
    if not isinstance(hp.model_name, str):
        raise ValueError(f"{args.hparams}: field 'model_name' must name a model to train on")
    check_out_dir(args.out, hp, hp.model_name, overwrite=args.overwrite)
    dataset = args.dataset or detect_dataset(Path(args.data))
    train = load_records(Path(args.data), dataset)
    val = load_records(Path(args.val_data), dataset) if args.val_data else None
    if launched_world()[1] > 1 and hp.model_parallel:
        raise ValueError(f"{args.hparams}: model_parallel is not supported under torchrun / accelerate launch (one "
                         "process per device holds a whole model copy); set model_parallel: false")
    reduce, device = init_from_environment()
    try:
        if device is not None:
            hp = hp.replace(device=str(device))
        model, tok = load_model_for(hp)
        result = train_hypernet(model, tok, hp, train, args.out, val_records=val, dataset=dataset,
                                resume=not args.no_resume, progress=not args.no_progress and reduce.is_first,
                                overwrite=args.overwrite, reduce=reduce)
    finally:
        shutdown(reduce)
    if not reduce.is_first:
        return 0
    if reduce.active:
        print(f"data-parallel over {reduce.world_size} processes; each batch was shared among them")
    print(f"trained {hp.alg_name} on {result.edits_seen} edits in {result.train_seconds:.1f} s "
          f"({result.seconds_per_edit:.3f} s/edit, {result.state.optimizer_steps} optimiser steps); archive: {result.archive}")
    rows = [[str(e["unit"]), f"{e['epoch']:.2f}", f"{e['loss']:.4f}", f"{e['val']['loss']:.4f}",
             *(f"{100 * e['val'][k]:.1f}" for k in ("efficacy", "generalization", "specificity"))]
            for e in result.state.history if "val" in e]
    if rows:
        from .table import format_table

        print(format_table(["unit", "epoch", "train loss", "val loss", "val ES", "val GS", "val LS"], rows))
        best = result.state
        print(f"archive holds the networks after unit {best.best_unit} (lowest validation loss {best.best_val_loss:.4f})"
              + ("; stopped early" if best.stopped_early else ""))
    return 0


# --------------------------------------------------------------------------------------------
# smedit compare
# --------------------------------------------------------------------------------------------


def setup_compare(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--train-data", type=Path, default=None)
    parser.add_argument("--eval-data", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(COMPARE_DEFAULT),
                        help="comma-separated: plugin methods and easyedit:<METHOD> for EasyEdit's own (e.g. easyedit:FT); "
                             "METHOD[field=value,...] runs a variant with hparams overrides (e.g. "
                             f"{COMPARE_DEFAULT[0]}[reg_coef=0])")
    parser.add_argument("--protocol", choices=("batch", "sequential", "consecutive", "single-round"), default="batch",
                        help="batch/sequential: hypernetwork methods; consecutive/single-round: "
                             + ", ".join(method_names(needs_archive=False)))
    parser.add_argument("--n-edits", type=int, default=64,
                        help="facts per edit batch (batch, sequential); total facts (consecutive, single-round)")
    parser.add_argument("--batch-size", type=int, default=10,
                        help="facts per step of the consecutive / single-round protocols (default: %(default)s)")
    parser.add_argument("--num-seq", type=int, default=1, help="edit batches that accumulate (sequential protocol)")
    parser.add_argument("--archives", type=Path, default=None, help="where trained archives are kept (default: cache)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="sequential protocol: also re-score all facts edited so far after every K sequences")
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
    from .compare import CompareConfig, format_general, format_table, parse_methods, plot_results, run_compare
    from .fileio import write_json_atomic

    cfg = CompareConfig(model=args.model, dataset=args.dataset, train_data=args.train_data, eval_data=args.eval_data,
                        methods=parse_methods(args.methods), protocol=args.protocol,
                        n_edits=args.n_edits, num_seq=args.num_seq, batch_size=args.batch_size,
                        archive_root=args.archives, retrain=args.retrain,
                        curve_every=args.curve_every, progress=not args.no_progress,
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
