"""Sequential editing with RLEdit2: K batches of n facts edited one after another, the edits accumulating.

1. Train RLEdit2's hypernetwork in sequential mode (trajectories of ``--num-seq`` batches of
   ``--n-edits`` facts) on the packaged ZsRE sample, or reuse the archive of a previous run.
2. Edit K = ``--num-seq`` batches of n unseen facts one after another through EasyEdit's
   ``BaseEditor.batch_edit(..., sequential_edit=True)`` (or, where the installed EasyEdit cannot run,
   the registered apply function directly, the call ``batch_edit`` makes). Nothing is restored
   between batches, so batch k edits the model that already carries batches 1..k-1.

Prints the plugin's teacher-forced ES / GS / LS of the first batch's facts before editing, right
after their edit and again after all K batches (do the first edits survive the later ones?), and of
all K*n facts before editing and at the end. Writes the numbers as JSON (``--out``).

    python examples/sequential_rledit2.py --n-edits 8 --num-seq 3 --max-steps 4
    python examples/sequential_rledit2.py --model tiny-smollm2 --train-records 4 --n-edits 2 --num-seq 2 \
        --max-steps 1 --rank 8 --out /tmp/rledit2.json                  # seconds, random model
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from example_utils import (add_model_argument, default_archive, easyedit_editor, easyedit_table, edit, load_model,
                           load_sample, scores, summarise_easyedit, table, train_or_reuse)

from smedit_plugin.hparams import load_method_hparams
from smedit_plugin.records import sample_path
from smedit_plugin.evaluation import evaluate_records
from smedit_plugin.fileio import write_json_atomic

METHOD = "RLEdit2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--train-data", type=Path, default=sample_path("zsre_sample"), help="ZsRE training records")
    parser.add_argument("--eval-data", type=Path, default=sample_path("zsre_sample_eval"),
                        help="ZsRE records to edit (the first K*n)")
    parser.add_argument("--train-records", type=int, default=None, help="train on the first N records (default: all)")
    parser.add_argument("--n-edits", type=int, default=8, help="n, facts per batch (default: %(default)s)")
    parser.add_argument("--num-seq", type=int, default=3,
                        help="K, batches edited one after another, also the training trajectory length "
                             "(default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop training after N trajectories (default: one pass)")
    parser.add_argument("--rank", type=int, default=None, help="hypernetwork rank (default: the YAML's)")
    parser.add_argument("--archive", type=Path, default=None, help="archive folder (default: in the smedit cache)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the archive exists")
    parser.add_argument("--out", type=Path, default=Path("sequential_rledit2.json"), help="JSON result file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.num_seq < 2:
        raise SystemExit(f"--num-seq {args.num_seq}: sequential editing needs at least 2 batches")
    model, tok, key = load_model(args.model)
    shrink = {"rank": args.rank} if args.rank else {}
    train_hp = load_method_hparams(METHOD, key, training=True).replace(
        n_edits=args.n_edits, num_seq=args.num_seq, val_n_edits=args.n_edits, max_steps=args.max_steps, **shrink)
    train = load_sample(args.train_data, args.train_records, "--train-records")
    n, k = args.n_edits, args.num_seq
    records = load_sample(args.eval_data, n * k, "--n-edits * --num-seq")
    batches = [records[i:i + n] for i in range(0, n * k, n)]
    archive = args.archive or default_archive(args.model, train_hp, args.train_data, len(train))
    training = train_or_reuse(model, tok, train_hp, train, archive, args.model, retrain=args.retrain,
                              progress=not args.no_progress)

    hp = load_method_hparams(METHOD, key, training=False).replace(archive=str(archive), batch_size=n, **shrink)
    unedited = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    first_unedited = evaluate_records(model, tok, batches[0], dataset="zsre", progress=False)
    editor, era = easyedit_editor(hp, model, tok)
    easyedit_metrics, seconds = [], []
    for number, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        easyedit_metrics += edit(editor, hp, model, tok, batch)
        seconds.append(time.perf_counter() - start)
        print(f"batch {number}/{k}: {n} facts edited in {seconds[-1]:.1f} s")
        if number == 1:
            first_fresh = evaluate_records(model, tok, batch, dataset="zsre", progress=False)
    first_final = evaluate_records(model, tok, batches[0], dataset="zsre", progress=False)
    final = evaluate_records(model, tok, records, dataset="zsre", progress=False)

    summary = summarise_easyedit(easyedit_metrics)
    if summary is not None:
        print("\nEasyEdit's metrics (each batch scored just before and just after its own edit):")
        print(easyedit_table(summary))
    print(f"\n{METHOD} on {args.model}: {k} batches of {n} facts, edits accumulating "
          f"({'BaseEditor.batch_edit' if editor is not None else 'apply function called directly'}); "
          f"scored {final['n_records']} facts at the end")
    print(table([(f"all {n * k} facts, unedited", unedited),
                 (f"batch 1 ({n} facts), unedited", first_unedited),
                 (f"batch 1 ({n} facts), right after its edit", first_fresh),
                 (f"batch 1 ({n} facts), after all {k} batches", first_final),
                 (f"all {n * k} facts, after all {k} batches", final)]))
    write_json_atomic(args.out, {
        "method": METHOD, "model": args.model, "n_edits": n, "num_seq": k, "n_facts": n * k,
        "easyedit_era": era, "path": "BaseEditor" if editor is not None else "apply_function",
        "edit_seconds_per_batch": seconds,
        **training, "unedited": scores(unedited), "first_batch_unedited": scores(first_unedited),
        "first_batch_after_its_edit": scores(first_fresh),
        "first_batch_final": scores(first_final), "all_final": scores(final), "easyedit": summary,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
