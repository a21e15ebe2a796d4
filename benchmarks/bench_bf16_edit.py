"""Hypernetwork edit quality of a bf16 model against fp32, with and without ``fp32_edit_weights`` (issue 18).

Loads SmolLM2 in float32, edits ZsRE eval facts in batches with a trained archive, scores them
(efficacy, generalisation, locality), restores; then the same in bfloat16 with the edit modules held
in float32 during the edit (the default) and with shifts added straight into bf16 weights.

    python benchmarks/bench_bf16_edit.py --archive /path/to/SMEdit-archive --n-edits 64 --batch 16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval.json"


def main() -> None:
    import torch

    from smedit_plugin.records import load_records
    from smedit_plugin.evaluation import METRICS
    from smedit_plugin.hparams import load_hparams
    from smedit_plugin.hypernet.archive import load_archive
    from smedit_plugin.hypernet.training import edit_and_score
    from smedit_plugin.models import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="archive directory written by `smedit train`")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n-edits", type=int, default=64, help="facts edited and scored")
    parser.add_argument("--batch", type=int, default=16, help="facts per edit batch (batches accumulate)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = json.loads((Path(args.archive) / "meta.json").read_text())
    hp = load_hparams(f"{meta['alg_name']}/{args.model}").replace(archive=str(args.archive))
    records = load_records(args.data, "zsre", limit=args.n_edits)
    rows = []
    model, tok = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    for label, dtype, option in (("float32", torch.float32, None), ("bfloat16, fp32_edit_weights", torch.bfloat16, None),
                                 ("bfloat16, shifts added in bf16", torch.bfloat16, False)):
        model.to(dtype)
        run_hp = hp.replace(fp32_edit_weights=option, model_dtype=str(dtype).replace("torch.", ""))
        editor, _ = load_archive(run_hp.archive, model, run_hp, device=torch.device("cpu"))
        start = time.perf_counter()
        metrics = edit_and_score(model, tok, editor, records, n_edits=args.batch)
        row = {"setting": label, "seconds": round(time.perf_counter() - start, 1),
               **{k: metrics[k] for k in METRICS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        model.to(torch.float32)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
