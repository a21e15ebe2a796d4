"""How much of a trained MALMEN-family hypernetwork's edit is just its learned edit step size ``lr``?

An untrained network is its normaliser (B = 0: pseudo keys / value gradients = normalised inputs,
spec §1.2 item 6). This probe fills the normaliser statistics the way training does (two BP steps on
every training batch, weights restored after each batch), then sets every module's ``lr`` to each
value of ``--lrs`` and batch-edits the evaluation facts with that otherwise untrained network. If the
scores track those of trained networks with the same ``lr``, training mostly moved ``lr``.

    python benchmarks/lr_only_probe.py --lrs 8e-5 1.6e-4 --n-train 256
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from smedit_plugin.hparams import load_method_hparams  # noqa: E402
from smedit_plugin.records import load_records  # noqa: E402
from smedit_plugin.hypernet.editor import HypernetEditor  # noqa: E402
from smedit_plugin.hypernet.training import edit_and_score  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="MALMEN2")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lrs", nargs="+", type=float, required=True)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-edits", type=int, default=64)
    p.add_argument("--validation", action="store_true",
                   help="score the n_edits training records after the first n_train (a validation split, for choosing "
                        "lr) instead of evaluation records")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("lr_only_probe.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hp = load_method_hparams(args.method, args.model, training=True).replace(n_edits=args.n_edits, num_seq=1)
    model, tok = load_model_and_tokenizer(args.model)
    train = load_records(DATA / "zsre_train.json", "zsre")[: args.n_train]
    if args.validation:
        evaluation = load_records(DATA / "zsre_train.json", "zsre")[args.n_train: args.n_train + args.n_edits]
    else:
        evaluation = load_records(DATA / "zsre_eval.json", "zsre")[: args.n_edits]
    torch.manual_seed(hp.seed)
    editor = HypernetEditor(model, hp)
    weights = [editor.edit_module(n).weight for n in editor.module_names]
    for w in weights:
        w.requires_grad_(True)
    for start in range(0, len(train), args.n_edits):
        batch = train[start:start + args.n_edits]
        snapshot = [w.detach().clone() for w in weights]
        mbs = editor.edit_micro_batches(tok, [r.prompt for r in batch], [r.target_new for r in batch])
        for s in range(hp.bp_steps):
            editor.bp_step(model, mbs, s, update_normaliser=True)
        with torch.no_grad():
            for w, saved in zip(weights, snapshot):
                w.copy_(saved)
    rows = []
    for lr in args.lrs:
        with torch.no_grad():
            for nets in editor.nets:
                for net in nets.values():
                    net.lr.weight.fill_(lr)
        m = edit_and_score(model, tok, editor, evaluation, n_edits=args.n_edits)
        rows.append({"method": args.method, "lr": lr, "scored_on": "validation" if args.validation else "evaluation", **{k: m[k] for k in ("efficacy", "generalization", "specificity")}})
        print(f"{args.method} untrained network, lr {lr:.2e}: ES/GS/LS "
              + "/".join(f"{100 * m[k]:.1f}" for k in ("efficacy", "generalization", "specificity")), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
