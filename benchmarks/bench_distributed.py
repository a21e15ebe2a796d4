"""Data-parallel training speed on one machine: ``smedit train`` alone vs under ``torchrun`` with N processes.

Both runs train the same TRAINING YAML on the same records for ``--max-steps`` units with one thread per
process, one after the other; the training seconds come from each archive's ``train_s_per_edit`` (rank 0's
clock, model loading excluded). Prints a table, the largest difference between the two archives' tensors,
and writes JSON. Run it on an otherwise idle machine with at least N cores.

    python benchmarks/bench_distributed.py --hparams TRAINING/SMEdit/smollm2-135m --max-steps 4 --nproc 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.table import format_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_train.json"


def train(command: list[str], out: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([*command, "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    from smedit_plugin.hypernet.archive import read_meta

    return read_meta(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hparams", default="TRAINING/SMEdit/smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_distributed.json"))
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = ["-m", "smedit_plugin.cli", "train", args.hparams, "--data", str(args.data), "--max-steps",
           str(args.max_steps), "--val-fraction", "0", "--n-epochs", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        alone = train([sys.executable, *cli], Path(tmp) / "alone", env)
        ranks = train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.nproc), *cli], Path(tmp) / "ranks", env)
        from safetensors.torch import load_file

        from smedit_plugin.hypernet.archive import archive_folder

        one = load_file(str(archive_folder(Path(tmp) / "alone") / "hypernet.safetensors"))
        two = load_file(str(archive_folder(Path(tmp) / "ranks") / "hypernet.safetensors"))
        max_diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    rows = [{"processes": 1, "threads_per_process": 1, "train_s_per_edit": alone["train_s_per_edit"]},
            {"processes": args.nproc, "threads_per_process": 1, "train_s_per_edit": ranks["train_s_per_edit"]}]
    speedup = alone["train_s_per_edit"] / ranks["train_s_per_edit"]
    print(format_table(["processes", "train s/edit", "speed-up"], [
        [str(r["processes"]), f"{r['train_s_per_edit']:.3f}", f"{alone['train_s_per_edit'] / r['train_s_per_edit']:.2f}x"]
        for r in rows]))
    print(f"largest difference between the archives' tensors: {max_diff:.2e}")
    args.out.write_text(json.dumps({"hparams": args.hparams, "max_steps": args.max_steps, "rows": rows,
                                    "speedup": speedup, "max_abs_diff": max_diff}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
