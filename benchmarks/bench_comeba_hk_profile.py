"""Where COMEBA-HK / MEMIT-C rounds spend their time: phase table of a py-spy profile of consecutive editing.

Record any run that edits (the benchmarks below, ``smedit compare``) with py-spy's raw (collapsed
stack) output, then read it here; only samples inside ``edit_step`` count, so loading, evaluation
and scoring are left out. Sampling does not slow the run noticeably, and the shares do not depend
on how busy the machine is the way wall-clock seconds do::

    py-spy record --pid PID --duration 400 --rate 20 --format raw --output round.txt --nonblocking
    python benchmarks/bench_comeba_hk_profile.py round.txt [more.txt ...] --out profile.json
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

#: Phases, first match wins: (label, any of these frame substrings on the stack).
PHASES = (
    ("z: first pass (prefix KV cache)", ("_first_pass",)),
    ("z steps: backward", ("Tensor.backward",)),
    ("z steps: KV-cache row selection", ("batch_select_indices",)),
    ("z steps: forward of the upper blocks", ("loss_rows",)),
    ("z: suffix buckets (setup)", ("_PrefixRunner.__init__",)),
    ("z steps: loss, logits, Adam", ("_chunk_target_values",)),
    ("keys and cur", ("compute_keys_and_cur",)),
    ("alpha calibration", ("calibrate_alpha",)),
    ("solve and update", ("consecutive_update", "solve_spd")),
)
#: Leaf frame of a dense matrix product in the forward pass (the backward's run inside autograd's C++ engine).
GEMM_LEAF = "Linear.forward"


def phase_table(path: Path) -> dict:
    """``{"samples", "phases": {label: share}, "linear_forward_share"}`` of one raw py-spy file."""
    counts: Counter[str] = Counter()
    total = linear = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or "edit_step" not in stack:
            continue
        samples = int(n)
        frames = stack.split(";")
        total += samples
        linear += samples if GEMM_LEAF in frames[-1] else 0
        label = next((name for name, keys in PHASES if any(k in f for f in frames for k in keys)), "other")
        counts[label] += samples
    if not total:
        raise SystemExit(f"{path}: no samples inside edit_step; was an editing run recorded with --format raw?")
    return {"samples": total, "phases": {k: v / total for k, v in counts.most_common()},
            "linear_forward_share": linear / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="py-spy --format raw files")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tables = {str(p): phase_table(p) for p in args.profiles}
    labels = list(dict.fromkeys(label for t in tables.values() for label in t["phases"]))
    names = [p.name[:18] for p in args.profiles]
    print(f"{'phase (share of samples in edit_step)':<40}" + "".join(f"{n:>20}" for n in names))
    for label in labels:
        print(f"{label:<40}" + "".join(f"{100 * t['phases'].get(label, 0.0):19.1f}%" for t in tables.values()))
    print(f"{'  of which Linear.forward (leaf)':<40}"
          + "".join(f"{100 * t['linear_forward_share']:19.1f}%" for t in tables.values()))
    print(f"{'samples':<40}" + "".join(f"{t['samples']:20d}" for t in tables.values()))
    if args.out:
        args.out.write_text(json.dumps(tables, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
