"""COMEBA-HK vs MEMIT-C on a real model: consecutive and single-round quality, step time, hooked inference time.

Protocols (paper §4, EasyEdit metrics via ``smedit_plugin.evaluation``: teacher-forced token
accuracy of the new target on the edit prompt (reliability) and its rephrase (generality);
locality = agreement of the edited model's arg-max with the unedited model's on the unrelated
question + answer):

* consecutive: ``--n-edits`` ZsRE records edited in steps of ``--batch-size`` on one model, all
  scored after the whole stream;
* single-round: batches of ``--single-batch`` records, each edited on the unedited model, scored,
  then rolled back through ``weights_copy`` exactly as EasyEdit's restore does;
* speed: seconds per consecutive step, and forward time of the hooked vs an unedited twin model
  on the same prompts (interleaved runs; median time of each, and median of per-run ratios).

Prints a table and writes JSON. Example (2 CPU cores: roughly one hour)::

    python benchmarks/bench_comeba_hk.py --n-edits 200 --out bench_comeba_hk.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model  # noqa: E402
from smedit_plugin.comeba_hk.state import find_state  # noqa: E402
from smedit_plugin.records import EditRecord, load_zsre  # noqa: E402
from smedit_plugin.requests import to_requests  # noqa: E402
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference  # noqa: E402
from smedit_plugin.fileio import write_json_atomic  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval.json"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_method_hparams(method: str, model_key: str, overrides: dict[str, Any]) -> COMEBAHKHyperParams:
    """The shipped YAML of ``method`` for ``model_key`` with ``--set`` overrides applied."""
    hp = COMEBAHKHyperParams.from_hparams(ROOT / "hparams" / method / f"{model_key}.yaml")
    return hp.replace(**overrides) if overrides else hp


def _scores(result: dict[str, Any]) -> dict[str, float]:
    out = {"reliability": result["efficacy"], "generality": result["generalization"], "locality": result["specificity"]}
    out["average"] = sum(out.values()) / 3
    return out


def _weighted(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in parts)
    return {key: sum(n * p[key] for n, p in parts) / total for key in parts[0][1]}


def consecutive(model, tok, hp: COMEBAHKHyperParams, records: list[EditRecord], reference, batch_size: int,
                eval_every: int) -> dict[str, Any]:
    """Edit ``records`` in consecutive steps on ``model``; score every edited record at the end (and every ``eval_every``)."""
    requests = to_requests(records)
    step_seconds, step_cpu, curve = [], [], []
    for start in range(0, len(records), batch_size):
        tick, cpu = time.perf_counter(), time.process_time()
        apply_comeba_hk_to_model(model, tok, requests[start:start + batch_size], hp)
        step_seconds.append(time.perf_counter() - tick)
        step_cpu.append(time.process_time() - cpu)
        done = start + batch_size
        print(f"  {hp.alg_name}: {min(done, len(records))} edits, step {step_seconds[-1]:.1f} s wall, "
              f"{step_cpu[-1]:.1f} s CPU", flush=True)
        if eval_every and done % eval_every == 0 and done < len(records):
            curve.append({"n_edits": done, **_scores(evaluate_records(
                model, tok, records[:done], dataset="zsre", locality="agreement", reference=reference[:done],
                progress=False))})
    final = _scores(evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                                     progress=False))
    curve.append({"n_edits": len(records), **final})
    alphas = None
    state = find_state(model)
    if state is not None and hp.hooks_enabled:
        alphas = [float(model.get_submodule(n).comeba_hook.alpha) for n in state.info["rewrite_modules"]]
    return {"scores": final, "curve": curve, "step_seconds": step_seconds, "step_cpu_seconds": step_cpu,
            "alpha": alphas}


def single_round(model, tok, hp: COMEBAHKHyperParams, records: list[EditRecord], reference,
                 batch_size: int) -> dict[str, Any]:
    """Each batch edited on the unedited model, scored, then rolled back by writing ``weights_copy`` back."""
    requests = to_requests(records)
    parts, seconds = [], []
    params = dict(model.named_parameters())
    for start in range(0, len(records), batch_size):
        tick = time.perf_counter()
        _, weights_copy = apply_comeba_hk_to_model(model, tok, requests[start:start + batch_size], hp,
                                                   return_orig_weights=True)
        seconds.append(time.perf_counter() - tick)
        batch = records[start:start + batch_size]
        parts.append((len(batch), _scores(evaluate_records(model, tok, batch, dataset="zsre", locality="agreement",
                                                           reference=reference[start:start + batch_size],
                                                           progress=False))))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights_copy.items():
                params[name][...] = value.to(params[name])
        print(f"  {hp.alg_name} single-round: {start + len(batch)} records, {parts[-1][1]}", flush=True)
    return {"scores": _weighted(parts), "step_seconds": seconds}


@torch.no_grad()
def inference_timing(hooked, plain, tok, prompts: list[str], runs: int) -> dict[str, Any]:
    """Forward time on the same right-padded batch, hooked and unedited twin interleaved."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    for model in (hooked, plain):
        model(**enc)
    times: dict[str, list[float]] = {"hooked": [], "unedited": []}
    for _ in range(runs):
        for name, model in (("unedited", plain), ("hooked", hooked)):
            tick = time.perf_counter()
            model(**enc)
            times[name].append(time.perf_counter() - tick)
    ratios = [h / u for h, u in zip(times["hooked"], times["unedited"])]
    return {"prompts": len(prompts), "runs": runs, "median_hooked_s": statistics.median(times["hooked"]),
            "median_unedited_s": statistics.median(times["unedited"]),
            "ratio_of_medians": statistics.median(times["hooked"]) / statistics.median(times["unedited"]),
            "median_ratio": statistics.median(ratios), "times": times}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["COMEBA-HK", "MEMIT-C"])
    parser.add_argument("--n-edits", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=0, help="also score the records edited so far every N edits")
    parser.add_argument("--single-batch", type=int, default=30)
    parser.add_argument("--single-n", type=int, default=60, help="records for single-round editing (0 = skip)")
    parser.add_argument("--skip-consecutive", action="store_true")
    parser.add_argument("--infer-runs", type=int, default=9)
    parser.add_argument("--data", type=Path, default=DATA, help="ZsRE records (default: the evaluation split); "
                        "choose hparams on ../shared/data/zsre/zsre_train.json, never on the records you report")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="hparams overrides (JSON values)")
    parser.add_argument("--single-set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="extra overrides for single-round editing only (the paper uses lambda 5000 there vs 15000)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 avoids "
                        "thread thrashing when other jobs share the cores")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the model is loaded in (the hook state stays float32/float64)")
    parser.add_argument("--out", type=Path, default=Path("bench_comeba_hk.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("smedit_plugin.comeba_hk").setLevel(logging.INFO)
    overrides = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    single_overrides = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.single_set)}
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tok = load_model_and_tokenizer(args.model, dtype=args.dtype)
    n_records = max(args.n_edits if not args.skip_consecutive else 0, args.single_n)
    records = load_zsre(args.data, limit=n_records)
    print(f"{len(records)} ZsRE records; locality reference on the unedited model", flush=True)
    reference = predict_locality_reference(base, tok, records)
    pre = _scores(evaluate_records(base, tok, records, dataset="zsre", locality="agreement", reference=reference,
                                   progress=False))
    results: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "n_edits": args.n_edits,
                               "batch_size": args.batch_size,
                               "threads": torch.get_num_threads(), "overrides": overrides,
                               "single_round_overrides": single_overrides, "unedited": pre,
                               "methods": {}}
    for method in args.methods:
        hp = load_method_hparams(method, args.model, overrides)
        entry: dict[str, Any] = {"hparams": hp.to_dict()}
        if not args.skip_consecutive:
            model = copy.deepcopy(base)
            entry["consecutive"] = consecutive(model, tok, hp, records[:args.n_edits], reference[:args.n_edits],
                                               args.batch_size, args.eval_every)
            steps = entry["consecutive"]["step_seconds"]
            cpu = entry["consecutive"]["step_cpu_seconds"]
            entry["seconds_per_step"] = {"mean": statistics.mean(steps), "median": statistics.median(steps),
                                         "max": max(steps), "first_step_includes_setup": steps[0],
                                         "cpu_median": statistics.median(cpu)}
            if hp.hooks_enabled:
                prompts = [r.prompt for r in records[:32]]
                entry["inference"] = inference_timing(model, base, tok, prompts, args.infer_runs)
            del model
        if args.single_n:
            model = copy.deepcopy(base)
            single_hp = hp.replace(batch_size=args.single_batch, **single_overrides)
            entry["single_round"] = single_round(model, tok, single_hp, records[:args.single_n],
                                                 reference[:args.single_n], args.single_batch)
            del model
        results["methods"][method] = entry
        write_json_atomic(args.out, results)
    _print_table(results)
    write_json_atomic(args.out, results)
    return results


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['model']}: {results['n_edits']} consecutive edits in steps of {results['batch_size']}")
    header = (f"{'method':<11}{'protocol':<14}{'rel':>7}{'gen':>7}{'loc':>7}{'avg':>7}{'s/step':>9}{'cpu s':>8}"
              f"{'infer x':>9}")
    print(header)
    print("-" * len(header))
    row = results["unedited"]
    print(f"{'unedited':<11}{'-':<14}{row['reliability']:7.3f}{row['generality']:7.3f}{row['locality']:7.3f}{row['average']:7.3f}")
    for method, entry in results["methods"].items():
        for protocol in ("consecutive", "single_round"):
            if protocol not in entry:
                continue
            s = entry[protocol]["scores"]
            step = statistics.median(entry[protocol]["step_seconds"])
            cpu = entry[protocol].get("step_cpu_seconds")
            cpu_text = f"{statistics.median(cpu):8.1f}" if cpu else f"{'-':>8}"
            infer = entry.get("inference", {}).get("median_ratio") if protocol == "consecutive" else None
            infer_text = f"{infer:9.3f}" if infer is not None else f"{'-':>9}"
            print(f"{method:<11}{protocol:<14}{s['reliability']:7.3f}{s['generality']:7.3f}{s['locality']:7.3f}"
                  f"{s['average']:7.3f}{step:9.1f}{cpu_text}{infer_text}")


if __name__ == "__main__":
    main()
