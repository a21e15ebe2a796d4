"""Where a 10-fact COMEBA-HK round spends its time: torch.profiler over one round after a few warm-up rounds.

Runs ``--warmup`` consecutive rounds of ``--batch-size`` ZsRE facts with the shipped YAML (``--set``
overrides allowed), then profiles the next round. Prints the round's wall time and target-value (z)
time, a breakdown by phase (z first pass, z steps forward, z steps backward, keys, the rest) and the
operators with the most self CPU time; writes the same as JSON.

    python benchmarks/bench_comeba_hk_profile.py --threads 1 --out profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model  # noqa: E402
from smedit_plugin.comeba_hk import main as comeba_main  # noqa: E402
from smedit_plugin.data import load_zsre, to_requests  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval.json"
#: Python functions whose inclusive time the phase table reports.
PHASES = {
    "z: first pass (prefix cache)": "_first_pass",
    "z: optimisation steps": "_chunk_target_values",
    "keys and cur": "compute_keys_and_cur",
    "alpha calibration": "calibrate_alpha",
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _timed(module: Any, name: str, sink: dict[str, float]) -> None:
    """Wrap ``module.name`` so its inclusive wall time is added to ``sink[name]``."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tick = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink[name] = sink.get(name, 0.0) + time.perf_counter() - tick

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="rounds edited before the profiled one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="hparams overrides (JSON values)")
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--out", type=Path, default=Path("bench_comeba_hk_profile.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from smedit_plugin.comeba_hk import compute_z

    hp = COMEBAHKHyperParams.from_hparams(ROOT / "hparams" / "COMEBA-HK" / f"{args.model}.yaml")
    overrides = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    hp = hp.replace(**overrides) if overrides else hp
    model, tok = load_model_and_tokenizer(args.model)
    requests = to_requests(load_zsre(args.data, limit=(args.warmup + 1) * args.batch_size))
    chunks = [requests[i:i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    warm = []
    for chunk in chunks[:-1]:
        tick = time.perf_counter()
        apply_comeba_hk_to_model(model, tok, chunk, hp)
        warm.append(time.perf_counter() - tick)
    phases: dict[str, float] = {}
    _timed(compute_z, "_first_pass", phases)
    _timed(compute_z, "_chunk_target_values", phases)
    _timed(comeba_main, "compute_keys_and_cur", phases)
    _timed(comeba_main, "calibrate_alpha", phases)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        apply_comeba_hk_to_model(model, tok, chunks[-1], hp)
        seconds = time.perf_counter() - tick
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    backward = sum(e.self_cpu_time_total for e in events if "Backward" in e.key or e.key.startswith("autograd::"))
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
    table = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_self,
              "calls": e.count} for e in ops]
    phase_rows = {label: phases.get(fn, 0.0) for label, fn in PHASES.items()}
    phase_rows["z: optimisation steps"] -= phase_rows["z: first pass (prefix cache)"]
    phase_rows["rest"] = seconds - sum(phase_rows.values())
    result = {"model": args.model, "threads": torch.get_num_threads(), "overrides": overrides,
              "warmup_round_seconds": warm, "round_seconds": seconds, "phases_seconds": phase_rows,
              "backward_self_cpu_share": backward / total_self, "ops": table,
              "note": "profiled round (profiler overhead included); the machine may be shared"}
    print(f"{args.model}, {args.batch_size} facts, round {args.warmup + 1} (profiled): {seconds:.1f} s; "
          f"warm-up rounds {', '.join(f'{s:.1f}' for s in warm)} s; {torch.get_num_threads()} threads")
    for label, value in phase_rows.items():
        print(f"  {label:<32}{value:8.2f} s {100 * value / seconds:6.1f} %")
    print(f"  backward ops: {100 * backward / total_self:.1f} % of self CPU time")
    print(f"\n{'operator':<44}{'self ms':>10}{'share':>8}{'calls':>8}")
    for row in table:
        print(f"{row['op'][:43]:<44}{row['self_cpu_ms']:10.0f}{100 * row['share']:7.1f}%{row['calls']:8d}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
