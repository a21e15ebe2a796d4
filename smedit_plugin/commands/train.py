"""``smedit train``: train a hypernetwork method into an archive (also under torchrun / accelerate launch)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .base import Runner



def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("hparams", help="a TRAINING yaml (hparams/TRAINING/<METHOD>/<model>.yaml) or its shipped name TRAINING/<METHOD>/<model>")
    parser.add_argument("--data", required=True, help="training records (ZsRE or CounterFact JSON)")
    parser.add_argument("--val-data", default=None,
                        help="validation records: loss and ES/GS/LS after every epoch, the archive keeps the best")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="override val_fraction: hold out this share of --data as the validation split")
    parser.add_argument("--n-epochs", type=int, default=None, help="override n_epochs (passes over --data)")
    parser.add_argument("--out", required=True, type=Path,
                        help="archive directory to write (resumed if it holds an archive of this run with the same "
                             "settings; a file, a damaged archive, or a folder holding other entries is refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write the archive beside entries of --out that smedit did not write (they are never "
                             "deleted) and replace another run's archive there")
    parser.add_argument("--continue-with-new-settings", action="store_true",
                        help="resume an archive of --out even though it was trained with other hparams or data "
                             "(refused otherwise, listing what differs); the archive then records both")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override max_steps: training batches or sequences, -1 = one full pass")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default=None)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    return run_train


def run_train(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets

    check_output_targets(folders={"--out": args.out})  # first: a wrong target costs a second, not an import of torch
    from contextlib import nullcontext

    from ..fileio import folder_lock
    from ..records import detect_dataset, load_records
    from ..hparams import load_hparams
    from ..distributed import init_from_environment, launched_world, shutdown
    from ..hypernet.hparams import HypernetHyperParams
    from ..hypernet.training import check_out_dir, train_hypernet, training_fingerprint
    from ..models import load_model_for

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
    resumable = check_out_dir(args.out, hp, hp.model_name, overwrite=args.overwrite)
    dataset = args.dataset or detect_dataset(Path(args.data))
    train = load_records(Path(args.data), dataset)
    val = load_records(Path(args.val_data), dataset) if args.val_data else None
    if resumable and not args.no_resume:  # other settings than the archive's are refused before the model loads
        check_out_dir(args.out, hp, hp.model_name, overwrite=args.overwrite,
                      fingerprint=training_fingerprint(hp, hp.model_name, train, val),
                      continue_with_new_settings=args.continue_with_new_settings)
    rank, world, _ = launched_world()
    if world > 1 and hp.model_parallel:
        raise ValueError(f"{args.hparams}: model_parallel is not supported under torchrun / accelerate launch (one "
                         "process per device holds a whole model copy); set model_parallel: false")
    with folder_lock(args.out) if rank == 0 else nullcontext():  # a second `smedit train --out` fails "in use"
        reduce, device = init_from_environment()
        try:
            if device is not None:
                hp = hp.replace(device=str(device))
            model, tok = load_model_for(hp)
            result = train_hypernet(model, tok, hp, train, args.out, val_records=val, dataset=dataset,
                                    resume=not args.no_resume, progress=not args.no_progress and reduce.is_first,
                                    overwrite=args.overwrite,
                                    continue_with_new_settings=args.continue_with_new_settings, reduce=reduce)
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
        from ..table import format_table

        print(format_table(["unit", "epoch", "train loss", "val loss", "val ES", "val GS", "val LS"], rows))
        best = result.state
        print(f"archive holds the networks after unit {best.best_unit} (lowest validation loss {best.best_val_loss:.4f})"
              + ("; stopped early" if best.stopped_early else ""))
    return 0
