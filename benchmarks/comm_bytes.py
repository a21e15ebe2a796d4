"""What data-parallel training (``torchrun``) sends per step for each shipped TRAINING YAML, counted, not measured.

Per BP step and edit module, every rank all-reduces (``hypernet/distributed.py``): the normaliser's row count,
sum and squared deviations (float64, ``d_in + d_out`` each), ``KᵀK`` (``d_in²``) and ``KᵀD`` (``d_in·d_out``) of
the ridge solve, and the meta-loss gradient ``G`` (``d_in·d_out``), in the hypernetwork's float32; per optimiser
step, the hypernetwork gradients (float32, one value per parameter). None of it depends on the batch size.
Widths are the models' ``hidden_size`` / ``intermediate_size`` (their config.json). A ring all-reduce moves
about twice the payload per rank.

    python benchmarks/comm_bytes.py --out comm_bytes.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.hparams import load_hparams  # noqa: E402
from smedit_plugin.hypernet.hparams import HypernetHyperParams  # noqa: E402
from smedit_plugin.table import format_table  # noqa: E402

#: (hidden_size, intermediate_size) from each model's config.json.
WIDTHS = {"gpt-j-6b": (4096, 16384), "llama3-8b": (4096, 14336), "gemma-2": (3584, 14336),
          "smollm2-135m": (576, 1536), "gemma-3-270m": (640, 2048)}
#: module name endings that map the hidden width to the intermediate one (the others map back).
UP = ("gate_proj", "up_proj", "fc_in")


def module_shapes(hp: HypernetHyperParams, model_key: str) -> list[tuple[int, int]]:
    d, f = WIDTHS[model_key]
    return [(d, f) if name.endswith(UP) else (f, d) for name in hp.edit_modules]


def hypernet_params(hp: HypernetHyperParams, shapes: list[tuple[int, int]]) -> int:
    """Parameters of every step network: per shape group, ``n_blocks`` residual blocks plus ``lr`` and ``lamda``."""
    groups: dict[tuple[int, int], int] = {}
    for shape in shapes:
        groups[shape] = groups.get(shape, 0) + 1
    ranks = hp.step_ranks()[:1] if hp.shared_hypernet_for(hp.num_seq) else hp.step_ranks()
    total = 0
    for rank in ranks:
        for (d_in, d_out), n in groups.items():
            hidden = d_in + d_out
            total += hp.n_blocks * (2 * hidden * rank + hidden + 2 * n * hidden) + 2 * n
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("comm_bytes.json"))
    args = parser.parse_args()
    rows = []
    for path in sorted((ROOT / "hparams" / "TRAINING").glob("*/*.yaml")):
        hp = load_hparams(path)
        model_key = path.stem.removesuffix("-seq")
        shapes = module_shapes(hp, model_key)
        solve = sum(8 + 3 * 8 * (i + o) + 4 * i * i + 4 * i * o for i, o in shapes)  # normaliser, KᵀK, KᵀD
        grads = sum(4 * i * o for i, o in shapes)  # G, once per meta-loss
        optimiser = 4 * hypernet_params(hp, shapes)
        if hp.num_seq == 1:  # batch: an optimiser step after every BP step
            unit = hp.bp_steps * (solve + grads + optimiser)
        else:  # sequential: per batch bp_steps solves and one G; one optimiser step per trajectory
            unit = hp.num_seq * (hp.bp_steps * solve + grads) + optimiser
        rows.append({"yaml": f"{path.parent.name}/{path.name}", "bp_steps": hp.bp_steps, "num_seq": hp.num_seq,
                     "per_bp_step_mb": (solve + grads) / 2**20, "per_optimizer_step_mb": optimiser / 2**20,
                     "per_training_unit_mb": unit / 2**20})
    print(format_table(["TRAINING yaml", "MB per BP step", "MB per optimiser step", "MB per batch / trajectory"], [
        [r["yaml"], f"{r['per_bp_step_mb']:.0f}", f"{r['per_optimizer_step_mb']:.0f}", f"{r['per_training_unit_mb']:.0f}"]
        for r in rows]))
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
