"""Peak memory of one COMEBA-HK step of many facts, with and without chunked target values (issue 18).

Each setting of ``z_chunk_size`` runs in its own process (peak RSS is per process), edits the same
facts with the shipped YAML and saves the hook layers' ``delta_w``; the parent prints a table of peak
RSS, step time and the largest difference of every ``delta_w`` from the first setting's, and writes JSON.

    python benchmarks/bench_comeba_hk_memory.py --n-edits 64 --chunks 0 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval.json"


def worker(args: argparse.Namespace) -> None:
    """One step in this process; writes delta_w tensors and a JSON line with time and peak RSS."""
    import torch
    from safetensors.torch import save_file

    from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
    from smedit_plugin.records import load_records
    from smedit_plugin.requests import to_requests
    from smedit_plugin.hparams import load_hparams
    from smedit_plugin.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    hp = load_hparams(f"COMEBA-HK/{args.model}").replace(z_chunk_size=args.chunk, batch_size=args.n_edits)
    records = load_records(args.data, "zsre", limit=args.n_edits)
    model, tok = load_model_and_tokenizer(args.model)
    start = time.perf_counter()
    apply_comeba_hk_to_model(model, tok, to_requests(records), hp)
    seconds = time.perf_counter() - start
    deltas = {name: param.detach().clone() for name, param in model.named_parameters() if name.endswith("delta_w")}
    save_file(deltas, str(args.save))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"z_chunk_size": args.chunk, "step_seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-edits", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16], help="z_chunk_size settings (0 = all at once)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_comeba_hk_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    rows, deltas = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in tqdm(args.chunks, desc="settings"):
            save = Path(tmp) / f"chunk{chunk}.safetensors"
            out = subprocess.run([sys.executable, __file__, "--worker", "--chunk", str(chunk), "--save", str(save),
                                  "--model", args.model, "--n-edits", str(args.n_edits), "--data", str(args.data),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            deltas.append(load_file(str(save)))
    for row, delta in zip(rows, deltas):
        diff = max(float((delta[n] - deltas[0][n]).abs().max()) for n in deltas[0])
        scale = max(float(deltas[0][n].abs().max()) for n in deltas[0])
        row.update({"n_edits": args.n_edits, "max_abs_delta_w_diff": diff, "max_abs_delta_w": scale})
    print(f"{'z_chunk_size':>12}  {'facts':>5}  {'step s':>7}  {'peak RSS MB':>11}  {'max |dW - dW(first)|':>21}")
    for r in rows:
        print(f"{r['z_chunk_size']:>12}  {r['n_edits']:>5}  {r['step_seconds']:>7.1f}  {r['peak_rss_mb']:>11.0f}  "
              f"{r['max_abs_delta_w_diff']:>21.3g}")
    print(f"(largest |delta_w| entry: {rows[0]['max_abs_delta_w']:.3g})")
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
