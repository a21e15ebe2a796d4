"""What costs COMEBA-HK its locality over a long consecutive run: the shrinking thresholds or the weights (issue 29).

Takes a finished consecutive ``smedit sweep`` folder, loads its final COMEBA-HK state and rescores the facts the
sweep edited, exactly as the sweep scored them (locality = agreement with the unedited model), once with the
saved per-layer ``alpha`` and once with every hook layer's ``alpha`` replaced by each value of ``--alphas``.
The hook weights are the same in every row, so the rows differ only in which tokens pass the scope test: if
locality comes back at a higher alpha while reliability holds, the thresholds cost the locality; if reliability
falls with it, the edits need the low thresholds.

    python benchmarks/comeba_hk_alpha.py --sweep runs/zsre-1000 --alphas 1.5,1.8,2.2 --out comeba_hk_alpha.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.comeba_hk import load_hook_state  # noqa: E402
from smedit_plugin.comeba_hk.hook_layers import HOOK_ATTR, HookLayer  # noqa: E402
from smedit_plugin.comeba_hk.state import find_state  # noqa: E402
from smedit_plugin.compare.sweep import read_rows, records_by_id  # noqa: E402
from smedit_plugin.compare.sweep_cell import load_config  # noqa: E402
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402
from smedit_plugin.table import format_table  # noqa: E402


def final_state(sweep: Path, row: dict[str, Any]) -> Path:
    """The ``final`` state folder the sweep saved for this row's cell."""
    for progress in sorted((sweep / "state").glob("*/progress.json")):
        folder = progress.parent / "final"
        info = json.loads(next(folder.glob("v-*/hook_state.json")).read_text())
        if info["alg_name"] == row["method"]:
            return folder
    raise SystemExit(f"no final state of {row['method']} under {sweep / 'state'}: run the sweep to its end first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a finished consecutive sweep's --out folder")
    parser.add_argument("--method", default="COMEBA-HK")
    parser.add_argument("--alphas", default="1.5,1.8,2.2", help="fixed thresholds to try on every hook layer")
    parser.add_argument("--sample", type=int, default=0, help="score a seeded sample of the edited facts (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("comeba_hk_alpha.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(json.loads((args.sweep / "sweep.json").read_text()))
    rows = [r for r in read_rows(args.sweep) if r["method"] == args.method and r["point"] is None]
    if not rows:
        raise SystemExit(f"{args.sweep / 'rows.jsonl'} has no finished {args.method} row")
    row = rows[-1]
    table, _, _ = records_by_id(cfg)
    ids = row["edit_ids"]
    if args.sample and args.sample < len(ids):
        ids = [ids[i] for i in sorted(random.Random(0).sample(range(len(ids)), args.sample))]
    records = [table[i] for i in ids]
    model, tok = load_model_and_tokenizer(cfg.model)
    reference = predict_locality_reference(model, tok, records)
    load_hook_state(model, final_state(args.sweep, row))
    controller = find_state(model)
    layers: list[HookLayer] = [getattr(model.get_submodule(n), HOOK_ATTR) for n in controller.info["rewrite_modules"]]
    saved = [float(layer.alpha) for layer in layers]
    results = []
    for label in ["saved"] + [a.strip() for a in args.alphas.split(",") if a.strip()]:
        values = saved if label == "saved" else [float(label)] * len(layers)
        with torch.no_grad():
            for layer, value in zip(layers, values):
                layer.alpha.fill_(value)
        scored = evaluate_records(model, tok, records, dataset=cfg.dataset, locality="agreement",
                                  reference=reference, progress=False, scoring=row["scoring"])
        quality = {"reliability": scored["efficacy"], "generality": scored["generalization"],
                   "locality": scored["specificity"], "portability": scored["portability"]}
        quality["average"] = (quality["reliability"] + quality["generality"] + quality["locality"]) / 3
        results.append({"alpha": label, "alphas": values, **quality})
        print(json.dumps(results[-1]), flush=True)
    print(format_table(["alpha", "reliability", "generality", "locality", "portability", "average"],
                [[r["alpha"] if r["alpha"] != "saved" else "saved " + " / ".join(f"{a:.2f}" for a in saved)]
                 + [f"{r[k]:.3f}" if r[k] is not None else "-"
                    for k in ("reliability", "generality", "locality", "portability", "average")]
                 for r in results]))
    args.out.write_text(json.dumps({"sweep": str(args.sweep), "method": args.method, "layers": controller.info["layers"],
                                    "n_edits": row["total"], "scored": len(records),
                                    "sweep_row": {k: row[k] for k in ("efficacy", "generalization", "specificity",
                                                                        "portability")},
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
