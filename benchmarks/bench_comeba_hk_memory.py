"""Peak memory of COMEBA-HK: one step of many facts with and without chunked target values (issue 18),
or the peak of every round of a long consecutive run (issue 29: flat memory).

Each setting of ``z_chunk_size`` runs in its own process (peak RSS is per process), edits the same
facts with the shipped YAML and saves the hook layers' ``delta_w``; the parent prints a table of peak
RSS, step time and the largest difference of every ``delta_w`` from the first setting's, and writes JSON.

    python benchmarks/bench_comeba_hk_memory.py --n-edits 64 --chunks 0 16

With ``--rounds N`` one process edits ``N`` consecutive rounds of ``--batch-size`` facts instead and
reports each round's own peak RSS (the kernel's high-water mark is reset before every round through
``/proc/self/clear_refs``), the RSS after it and its seconds; the acceptance of issue 29 is the peak
of round 100 at most 1.1x the peak of round 10:

    python benchmarks/bench_comeba_hk_memory.py --rounds 100 --data ../shared/data/zsre/zsre_train.json
    python benchmarks/bench_comeba_hk_memory.py --rounds 100 --model tiny --data ../shared/data/zsre/zsre_train.json
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
#: ``--model tiny``: a random 4-layer Llama of width 64 (smedit_plugin.testing) with these hparams, for a quick
#: check that nothing grows from round to round (the acceptance itself is on SmolLM2).
TINY = "tiny"
TINY_HPARAMS = dict(layers=[1, 2], v_loss_layer=3, v_num_grad_steps=5, clamp_norm_factor=4.0, mom2_update_weight=10.0,
                    mom2_n_samples=200, mom2_max_len=64, context_template_length_params=[[10, 5]],
                    rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                    mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                    ln_f_module="model.norm", lm_head_module="lm_head", calibrate_with_validated_hooks=True)


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


def rounds_worker(args: argparse.Namespace) -> dict:
    """``args.rounds`` consecutive rounds in this process: per-round peak RSS, RSS after, seconds."""
    import gc

    import torch

    from smedit_plugin.comeba_hk import apply_comeba_hk_to_model
    from smedit_plugin.hparams import load_method_hparams
    from smedit_plugin.memory import reset_peak, status_mb
    from smedit_plugin.models import load_model_and_tokenizer
    from smedit_plugin.records import load_records
    from smedit_plugin.requests import to_requests

    if args.threads:
        torch.set_num_threads(args.threads)
    needed = args.rounds * args.batch_size
    records = load_records(args.data, "zsre", limit=needed)
    if len(records) < needed:  # e.g. 998 usable training records for 100 rounds of 10
        print(f"--data has {len(records)} usable records for {needed} edits; the last "
              f"{needed - len(records)} edits reuse records from the start", flush=True)
        records = (records * (needed // len(records) + 1))[:needed]
    requests = to_requests(records)
    if args.model == TINY:
        from smedit_plugin.comeba_hk import COMEBAHKHyperParams
        from smedit_plugin.testing import tiny_model

        model, tok = tiny_model("llama3", n_layers=4)
        hp = COMEBAHKHyperParams(alg_name=args.method, model_name=TINY, **TINY_HPARAMS)
    else:
        hp = load_method_hparams(args.method, args.model)
        model, tok = load_model_and_tokenizer(args.model)
    rows = []
    for index in range(args.rounds):
        gc.collect()
        reset_peak()  # the round's own peak RSS
        start = time.perf_counter()
        apply_comeba_hk_to_model(model, tok, requests[index * args.batch_size:(index + 1) * args.batch_size], hp)
        rows.append({"round": index + 1, "seconds": time.perf_counter() - start, "peak_rss_mb": status_mb("VmHWM"),
                     "rss_after_mb": status_mb("VmRSS")})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": args.model, "method": args.method, "batch_size": args.batch_size, "rounds": rows}


def _report_rounds(result: dict, out: Path) -> None:
    rows = result["rounds"]
    marks = sorted({r for r in (1, 10, 20, 50, 100, len(rows)) if r <= len(rows)})
    print(f"{result['method']} on {result['model']}, rounds of {result['batch_size']} facts")
    print(f"{'round':>6}  {'peak RSS MB':>11}  {'RSS after MB':>12}  {'seconds':>8}")
    for mark in marks:
        r = rows[mark - 1]
        print(f"{mark:>6}  {r['peak_rss_mb']:>11.0f}  {r['rss_after_mb']:>12.0f}  {r['seconds']:>8.1f}")
    if len(rows) >= 10:
        ratio = rows[-1]["peak_rss_mb"] / rows[9]["peak_rss_mb"]
        result["peak_ratio_last_to_round_10"] = ratio
        print(f"peak RSS round {len(rows)} / round 10: {ratio:.3f} (issue 29: at most 1.1)")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"a model key, or {TINY!r} (with --rounds)")
    parser.add_argument("--n-edits", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16], help="z_chunk_size settings (0 = all at once)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="consecutive rounds in one process (0 = the chunk table)")
    parser.add_argument("--batch-size", type=int, default=10, help="facts per round with --rounds")
    parser.add_argument("--method", default="COMEBA-HK", help="COMEBA-HK or MEMIT-C (with --rounds)")
    parser.add_argument("--out", type=Path, default=Path("bench_comeba_hk_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds:
        out = args.out if args.out != Path("bench_comeba_hk_memory.json") else Path("bench_comeba_hk_memory_rounds.json")
        _report_rounds(rounds_worker(args), out)
        return
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
