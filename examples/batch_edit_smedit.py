"""Batch-edit N facts with SMEdit through EasyEdit, after training (or reusing) its hypernetworks.

1. Train SMEdit's hypernetworks on the packaged ZsRE sample (300 facts), or reuse the archive a
   previous run wrote (the cache folder is named after the training settings).
2. Register the plugin in EasyEdit and build a ``BaseEditor`` for the model with ``load_editor``,
   then ``editor.batch_edit(**to_edit_kwargs(records), sequential_edit=True)`` edits N unseen facts
   in one batch. Where the installed EasyEdit cannot run (the 2023 PyPI wheel needs CUDA), the
   registered apply function is called directly instead, the exact call ``batch_edit`` makes.

Prints: EasyEdit's per-record metrics summarised (rewrite / rephrase / locality accuracy, before and
after the edit; BaseEditor path only), each fact's greedy answer before and after the edit, and a
final table of the plugin's teacher-forced ES / GS / LS before and after. Writes all of it as JSON
(``--out``).

    python examples/batch_edit_smedit.py --n-edits 16
    python examples/batch_edit_smedit.py --model tiny-smollm2 --train-records 8 --train-batch 4 \
        --max-steps 1 --rank 8 --n-edits 4 --out /tmp/smedit.json        # seconds, random model
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from example_utils import (add_model_argument, default_archive, easyedit_editor, easyedit_table, edit, load_model,
                           load_sample, scores, summarise_easyedit, table, train_or_reuse)

from smedit_plugin.commands.demo import greedy_answers
from smedit_plugin.hparams import load_method_hparams
from smedit_plugin.records import sample_path
from smedit_plugin.evaluation import evaluate_records
from smedit_plugin.fileio import write_json_atomic

METHOD = "SMEdit"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--train-data", type=Path, default=sample_path("zsre_sample"), help="ZsRE training records")
    parser.add_argument("--eval-data", type=Path, default=sample_path("zsre_sample_eval"),
                        help="ZsRE records to edit (the first --n-edits)")
    parser.add_argument("--train-records", type=int, default=None, help="train on the first N records (default: all)")
    parser.add_argument("--train-batch", type=int, default=None, help="facts per training batch (default: the YAML's)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop training after N batches (default: one pass)")
    parser.add_argument("--rank", type=int, default=None, help="hypernetwork rank (default: the YAML's)")
    parser.add_argument("--n-edits", type=int, default=16, help="facts edited in one batch (default: %(default)s)")
    parser.add_argument("--archive", type=Path, default=None, help="archive folder (default: in the smedit cache)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the archive exists")
    parser.add_argument("--out", type=Path, default=Path("batch_edit_smedit.json"), help="JSON result file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tok, key = load_model(args.model)
    shrink = {"rank": args.rank} if args.rank else {}
    train_hp = load_method_hparams(METHOD, key, training=True).replace(max_steps=args.max_steps, **shrink)
    if args.train_batch:
        train_hp = train_hp.replace(n_edits=args.train_batch)
    train = load_sample(args.train_data, args.train_records, "--train-records")
    records = load_sample(args.eval_data, args.n_edits, "--n-edits")
    archive = args.archive or default_archive(args.model, train_hp, args.train_data, len(train))
    training = train_or_reuse(model, tok, train_hp, train, archive, args.model, retrain=args.retrain,
                              progress=not args.no_progress)

    # editing hparams: the same networks (rank), the archive just trained, all N facts in one batch
    hp = load_method_hparams(METHOD, key, training=False).replace(archive=str(archive), batch_size=len(records), **shrink)
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    answers_before = greedy_answers(model, tok, prompts, targets)
    before = evaluate_records(model, tok, records, dataset="zsre", progress=False)

    editor, era = easyedit_editor(hp, model, tok)
    start = time.perf_counter()
    easyedit_metrics = edit(editor, hp, model, tok, records)
    edit_seconds = time.perf_counter() - start

    answers_after = greedy_answers(model, tok, prompts, targets)
    after = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    summary = summarise_easyedit(easyedit_metrics)
    if summary is not None:
        print(f"\nEasyEdit's metrics over its {summary['n_records']} per-record dicts:")
        print(easyedit_table(summary))
    print("\nprompt -> new target | answer before | answer after")
    for prompt, target, old, new in zip(prompts, targets, answers_before, answers_after):
        print(f"  {prompt} -> {target} | {old} | {new}")
    print(f"\n{METHOD} on {args.model}: {len(records)} facts edited in one batch in {edit_seconds:.1f} s "
          f"({'BaseEditor.batch_edit' if editor is not None else 'apply function called directly'})")
    print(table([("before edit", before), (f"after {METHOD}", after)]))
    write_json_atomic(args.out, {
        "method": METHOD, "model": args.model, "n_edits": len(records),
        "easyedit_era": era, "path": "BaseEditor" if editor is not None else "apply_function",
        "edit_seconds": edit_seconds,
        **training, "before": scores(before), "after": scores(after), "easyedit": summary,
        "answers": [{"prompt": p, "target_new": t, "before": b, "after": a}
                    for p, t, b, a in zip(prompts, targets, answers_before, answers_after)],
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
