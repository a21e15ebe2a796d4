"""Cost against the machine's limit: model-FLOPs utilisation of hypernetwork training and editing (issue 27.5).

For each method, one training unit (``max_steps: 1`` of its TRAINING YAML; a meta-batch of ``--n-edits``
facts for the batch methods, one trajectory for the sequential ones) and one batch edit of ``--edit-facts``
facts (edit YAML, untrained networks: the work does not depend on what they learned) are

* counted: floating-point operations of every matrix product (``torch.utils.flop_counter.FlopCounterMode``:
  mm, addmm, bmm, attention, in the forward and the backward passes),
* timed: wall seconds of a fresh run (the fastest of ``--repeats``),
* profiled: self time by op (``torch.profiler``), of which the five largest that are not matrix products
  are printed with their share of the profiled time.

The dense matmul peak is measured in the same process, at the same dtype and thread count (square
``torch.mm`` of several sizes, the fastest counts), before and after the runs (the higher counts).
MFU = counted FLOPs / seconds / peak. The Cholesky factorisations and triangular solves of the ridge
systems are not counted (no FLOP formula; d_in³/3 = 64 MFLOP per module for SmolLM2, under 0.1 % here).

    python benchmarks/mfu.py --methods SMEdit --kinds train --n-edits 256 --threads 2
    python benchmarks/mfu.py --smoke      # tiny random model, seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from smedit_plugin.compare.config import parse_overrides  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train.json"
METHODS = ("SMEdit", "MALMEN2", "MALMEN1", "RLEdit2", "RLEdit1")
#: profiler op names that are matrix products (their time is the "matmul" part; everything else is listed)
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                        "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::addbmm",
                        "aten::_addmm_activation", "aten::dot", "aten::mv", "aten::addmv"})
#: ``--smoke``: a 4-layer tiny model, two of its modules, small networks and micro-batches (sequential methods:
#: 2 batches of 2 facts)
SMOKE_LAYERS = 4
SMOKE_OVERRIDES = dict(edit_modules=["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"], rank=8,
                       n_blocks=2, micro_batch_size=2, chunk_size=16)


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, sizes: tuple[int, ...] = (1024, 2048, 3072)) -> float:
    """Highest FLOP/s of square ``torch.mm`` over ``sizes`` (each timed for about ``seconds``)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def count_flops(run: Callable[[], None]) -> tuple[int, dict[str, int]]:
    """Total matmul-family FLOPs of ``run()`` and the split by op."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def non_matmul_costs(run: Callable[[], None], top: int = 5) -> tuple[float, float, list[dict[str, Any]]]:
    """``(profiled seconds, matmul share, the ``top`` largest other ops)`` by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(s for _, s in events)
    matmul = sum(s for k, s in events if k in MATMUL_OPS)
    others = sorted(((k, s) for k, s in events if k not in MATMUL_OPS), key=lambda item: -item[1])[:top]
    return total, matmul / total, [{"op": k, "seconds": s, "share": s / total} for k, s in others]


def _records(args: argparse.Namespace, n: int) -> list:
    from smedit_plugin.records import EditRecord, load_records

    if args.smoke:
        subjects = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin"]
        return [EditRecord(prompt=f"The city of {s} is located in", target_new="the country of Atlantis",
                           rephrase_prompts=(f"{s} can be found in",),
                           locality_prompts=(f"The river through {s} is the",), locality_answers=("Seine",))
                for s in (subjects * (n // len(subjects) + 1))[:n]]
    records = load_records(args.data, "counterfact", limit=n)
    if len(records) < n:
        raise SystemExit(f"{args.data} has {len(records)} usable records, {n} needed")
    return records


def _hparams(args: argparse.Namespace, method: str, training: bool) -> Any:
    from smedit_plugin.hparams import load_method_hparams

    hp = load_method_hparams(method, "smollm2-135m" if args.smoke else args.model, training=training)
    changes: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
    changes.update(args.set)
    if training:
        changes.update(max_steps=1, n_epochs=1, val_fraction=0.0)
        if hp.num_seq == 1:
            changes["n_edits"] = args.n_edits
        elif args.smoke:
            changes.update(n_edits=2, num_seq=2)
    return hp.replace(**changes)


def _runner(args: argparse.Namespace, model: Any, tok: Any, method: str, kind: str) -> tuple[Callable[[], Callable[[], None]], int]:
    """``(make, facts)``: ``make()`` sets up a fresh unit or edit and returns the call to measure."""
    from smedit_plugin.hypernet.editor import HypernetEditor, edit_batch
    from smedit_plugin.hypernet.trainer import MetaTrainer

    hp = _hparams(args, method, training=kind == "train")
    if kind == "train":
        records = _records(args, hp.n_edits * hp.num_seq)

        def make_train() -> Callable[[], None]:
            torch.manual_seed(0)
            trainer = MetaTrainer(model, tok, hp)
            return lambda: trainer.train(records, progress=False) and None

        return make_train, len(records)
    records = _records(args, args.edit_facts)
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]

    def make_edit() -> Callable[[], None]:
        torch.manual_seed(0)
        editor = HypernetEditor(model, hp)
        return lambda: edit_batch(model, tok, editor, prompts, targets).restore()

    return make_edit, len(records)


def measure(args: argparse.Namespace, model: Any, tok: Any, method: str, kind: str, peak: float) -> dict[str, Any]:
    make, facts = _runner(args, model, tok, method, kind)
    flops, by_op = count_flops(make())  # also the warm-up
    seconds = min(_timed(make()) for _ in range(args.repeats))
    profiled, matmul_share, others = non_matmul_costs(make())
    achieved = flops / seconds
    return {"method": method, "kind": kind, "facts": facts, "gflop": flops / 1e9, "seconds": seconds,
            "gflops": achieved / 1e9, "mfu": achieved / peak, "profiled_seconds": profiled,
            "matmul_share_of_profile": matmul_share, "top_non_matmul": others,
            "flops_by_op": {k: v / 1e9 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--kinds", nargs="+", choices=("train", "edit"), default=["train", "edit"])
    parser.add_argument("--n-edits", type=int, default=256, help="meta-batch of the batch methods' training unit")
    parser.add_argument("--edit-facts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="hparams overrides (e.g. micro_batch_size=16)")
    parser.add_argument("--smoke", action="store_true", help="tiny random SmolLM2-shaped model, small hparams, synthetic facts")
    parser.add_argument("--out", type=Path, default=Path("mfu.json"))
    args = parser.parse_args(argv)
    args.set = list(parse_overrides(args.set).items())
    if args.smoke:
        args.n_edits, args.edit_facts = min(args.n_edits, 4), min(args.edit_facts, 4)
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    if args.smoke:
        from smedit_plugin.testing import tiny_model

        model, tok = tiny_model("smollm2", n_layers=SMOKE_LAYERS)
    else:
        from smedit_plugin.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(args.model, dtype="float32")
    seconds = 0.05 if args.smoke else 1.0
    sizes = (256,) if args.smoke else (1024, 2048, 3072)
    peak = matmul_peak(dtype, seconds, sizes)
    rows = [measure(args, model, tok, method, kind, peak) for method in args.methods for kind in args.kinds]
    peak = max(peak, matmul_peak(dtype, seconds, sizes))
    for row in rows:
        row["mfu"] = row["gflops"] * 1e9 / peak
    _report(rows, peak, args)
    args.out.write_text(json.dumps({"peak_gflops": peak / 1e9, "threads": args.threads, "dtype": str(dtype),
                                    "model": "tiny" if args.smoke else args.model, "set": dict(args.set),
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


def _report(rows: list[dict[str, Any]], peak: float, args: argparse.Namespace) -> None:
    from smedit_plugin.table import format_table

    print(f"dense fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {args.threads} thread(s)")
    print(format_table(["method", "kind", "facts", "GFLOP", "seconds", "GFLOP/s", "MFU", "matmul share"],
                       [[r["method"], r["kind"], str(r["facts"]), f"{r['gflop']:.1f}", f"{r['seconds']:.2f}",
                         f"{r['gflops']:.1f}", f"{100 * r['mfu']:.1f} %", f"{100 * r['matmul_share_of_profile']:.0f} %"]
                        for r in rows], left=2))
    for r in rows:
        print(f"\n{r['method']} {r['kind']}: largest costs that are not matrix products (share of profiled time "
              f"{r['profiled_seconds']:.2f} s)")
        print(format_table(["op", "seconds", "share"], [[o["op"], f"{o['seconds']:.3f}", f"{100 * o['share']:.1f} %"]
                                                        for o in r["top_non_matmul"]]))


if __name__ == "__main__":
    main()
