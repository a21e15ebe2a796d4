"""Estimated peak memory of each method on each large-model YAML (no GPU here, so counted, not measured).

Counts, item by item, the tensors the code holds at its peak, from the shipped YAML and the
architecture's sizes: model weights, the method's state and copies, the largest temporaries, and a
rough activation term. Assumptions (printed with the tables): ``ANSWER_TOKENS`` cached rows per fact,
activations of ``ACT_HIDDEN`` x hidden + ``ACT_INTER`` x intermediate elements per token and layer,
the COMEBA-HK z optimisation at its chunk of facts with every context template. GB = 1e9 bytes.

    python benchmarks/estimate_memory.py [--out memory.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.hparams import load_hparams  # noqa: E402
from smedit_plugin.methods import HYPERNET_FAMILY, LOCATE_FAMILY, methods_of_family  # noqa: E402
from smedit_plugin.models import ARCHITECTURES, ArchitectureInfo  # noqa: E402

#: Parameters, vocabulary and KV width (n_kv_heads x head_dim) of the hub checkpoints the large YAMLs name (model cards).
CHECKPOINTS = {"llama3-8b": (8.03e9, 128256, 1024), "gemma-2": (9.24e9, 256000, 2048), "gpt-j-6b": (6.05e9, 50400, 4096)}
#: Cached rows (answer tokens) per edited fact, ZsRE-like targets.
ANSWER_TOKENS = 5
#: Saved activation elements per token and layer for a backward pass, in units of (hidden, intermediate).
ACT_HIDDEN, ACT_INTER = 12, 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
#: Module roles whose linear layer maps the hidden width to the intermediate one.
WIDENING = ("gate", "up", "fc_in")


def module_shape(arch: ArchitectureInfo, name: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of the edit module ``name``, from the role whose whole template it matches."""
    for role, template in arch.modules.items():
        pattern = re.escape(template).replace(re.escape("{i}"), r"\d+")
        if "{i}" in template and re.fullmatch(pattern, name):
            if role in WIDENING:
                return arch.hidden_size, arch.intermediate_size
            if role in ("down", "fc_out"):
                return arch.intermediate_size, arch.hidden_size
            break
    raise ValueError(f"{name!r} is not an MLP projection of {arch.key} ({', '.join(arch.modules.values())})")


def _activations(arch: ArchitectureInfo, tokens: int, layers: int, b: int) -> float:
    return tokens * layers * (ACT_HIDDEN * arch.hidden_size + ACT_INTER * arch.intermediate_size) * b


def hypernet(key: str, hp: Any, training: bool) -> dict[str, float]:
    """Bytes of each item at the peak of an edit (``batch_size`` facts) or a training unit (``n_edits`` facts)."""
    arch = ARCHITECTURES[key]
    params, vocab, _ = CHECKPOINTS[key]
    b = BYTES[hp.model_dtype or "float32"]
    fp32_copies = b < 4 and hp.fp32_edit_weights is not False
    wb = 4 if fp32_copies else b  # bytes of an edited weight while the edit runs
    shapes = [module_shape(arch, name) for name in hp.edit_modules]
    edited = sum(i * o for i, o in shapes)
    groups = {s: shapes.count(s) for s in shapes}
    nets = 1 if hp.shared_hypernet_for(hp.num_seq) else hp.bp_steps
    ranks = hp.step_ranks(hp.num_seq)[:nets]
    net_params = sum(hp.n_blocks * (2 * (i + o) * r + (i + o) * (1 + 2 * n)) + 4 * (i + o)
                     for (i, o), n in groups.items() for r in ranks)
    rows = (hp.n_edits if training else hp.batch_size) * ANSWER_TOKENS
    cache = [rows * (i + o) * 4 for i, o in shapes]  # keys | value grads, float32
    factor = [min(rows, i) ** 2 * 4 for i, _ in shapes]  # the Cholesky factor (primal or dual form)
    shift = [i * o * 4 for i, o in shapes]
    # while module k is solved: its ridge matrix next to the factor, its value diffs, its weight + shift check
    transient = [factor[k] + rows * o * 4 + i * o * wb for k, (i, o) in enumerate(shapes)]
    if training:
        # the step's record keeps every module's rows, factor and shift for the meta-gradient; sequential
        # training keeps the records of all bp_steps of the current batch
        records = 1 if hp.num_seq == 1 else hp.bp_steps
        step = records * sum(cache[k] + factor[k] + shift[k] for k in range(len(shapes))) + max(transient)
    else:
        # edit time drops each module's rows and solver once its shift is computed; shifts wait for the step's check
        step = max(sum(cache[k:]) + sum(shift[:k + 1]) + factor[k] + transient[k] for k in range(len(shapes)))
    tokens = hp.micro_batch_size * hp.max_length
    parts = {"weights": params * b, "snapshot": edited * b, "fp32 edit weights": 4 * edited if fp32_copies else 0,
             "hypernetwork": net_params * 4 * (4 if training else 1),  # training: + grads + Adam's two moments
             "BP step": step,
             "activations": _activations(arch, tokens, arch.n_layers, b) + tokens * vocab * 4 * 2}
    if training:
        # G summed over micro-batches, next to one micro-batch's autograd weight gradients (or to G + the
        # norm penalty's gradient, built after them): two float32 weight-sized tensors per module
        parts["meta-loss gradients"] = 2 * edited * 4
        if hp.locality_coef() > 0:  # reference logits of the unit's locality answers (and the window's next ones)
            window = min(getattr(hp, "back_depth", 1), hp.num_seq)
            parts["reference logits"] = (2 * window if hp.num_seq > 1 else 1) * hp.n_edits * ANSWER_TOKENS * vocab * 4
        if hp.val_fraction > 0:
            parts["best networks copy"] = net_params * 4
    return parts


def locate(key: str, hp: Any, via_easyedit: bool) -> dict[str, float]:
    """Bytes of each item at the peak of one COMEBA-HK / MEMIT-C step after the first."""
    arch = ARCHITECTURES[key]
    params, vocab, kv = CHECKPOINTS[key]
    b = BYTES[hp.model_dtype or "float32"]
    m = BYTES[hp.mom2_dtype]
    f, d, n_layers = arch.intermediate_size, arch.hidden_size, len(hp.layers)
    hooks = hp.hooks_enabled
    n_templates = 1 + sum(n for _, n in hp.context_template_length_params)
    facts = min(hp.z_chunk_size or hp.batch_size, hp.batch_size)
    prompt_tokens = facts * (n_templates + 1) * (max(length for length, _ in hp.context_template_length_params) + 20)
    upper = max(hp.v_loss_layer, hp.layers[-1]) - hp.layers[-1]
    parts = {"weights": params * b,
             "C_accu": n_layers * f * f * m,
             "delta_w + its snapshot" if hooks else "weight snapshot": n_layers * d * f * (8 if hooks else b),
             "update system + factor": 2 * f * f * 8,  # float64, one layer at a time
             "z optimisation": prompt_tokens * arch.n_layers * 2 * kv * b  # KV cache of every prompt
             + _activations(arch, facts * n_templates * 8, upper, b) + facts * n_templates * 4 * vocab * 4 * 3}
    if hooks and b < 4:  # the hook's GEMM runs in the model dtype on a copy of delta_w
        parts["delta_w in the model dtype"] = n_layers * d * f * b
    if via_easyedit:
        parts["C_accu copy (weights_copy)"] = n_layers * f * f * m
    if not hooks and b < 4 and hp.fp32_edit_weights is not False:
        parts["fp32 edit weights"] = n_layers * d * f * 4
    return parts


def estimate() -> list[dict[str, Any]]:
    """One row per (model, method, run, YAML variant) with every item in bytes."""
    rows = []
    for key in CHECKPOINTS:
        for method in methods_of_family(HYPERNET_FAMILY):
            for sub, training in ((method, False), (f"TRAINING/{method}", True)):
                for path in sorted((ROOT / "hparams" / sub).glob(f"{key}*.yaml")):
                    hp = load_hparams(str(path))
                    rows.append({"model": key, "method": method, "run": "train" if training else "edit",
                                 "variant": path.stem[len(key):].lstrip("-") or "default",
                                 "items": hypernet(key, hp, training)})
        for method in methods_of_family(LOCATE_FAMILY):
            hp = load_hparams(f"{method}/{key}")
            for run, via in (("step", False), ("step via EasyEdit", True)):
                rows.append({"model": key, "method": method, "run": run, "variant": "default",
                             "items": locate(key, hp, via_easyedit=via)})
    return rows


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write every row and item (bytes) as JSON")
    args = parser.parse_args()
    rows = estimate()
    keys = list(CHECKPOINTS)
    table: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        parts = row["items"]
        top = max((k for k in parts if k != "weights"), key=parts.get)
        table.setdefault((row["method"], row["run"], row["variant"]), {})[row["model"]] = \
            f"{sum(parts.values()) / 1e9:.0f} ({top} {parts[top] / 1e9:.1f})"
    print("Peak GB (largest item after the weights)\n")
    print("| method | run | YAML | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for (method, run, variant), cells in table.items():
        print(f"| {method} | {run} | {variant} | " + " | ".join(cells.get(k, "-") for k in keys) + " |")
    for key in keys:
        for family, title in ((True, "hypernetwork methods"), (False, "COMEBA-HK and MEMIT-C")):
            mine = [r for r in rows if r["model"] == key and (r["method"] in methods_of_family(HYPERNET_FAMILY)) == family]
            items = list(dict.fromkeys(item for r in mine for item in r["items"]))
            print(f"\n{key}, {title}, item by item (GB)\n")
            print("| method | run | YAML | total | " + " | ".join(items) + " |")
            print("|---|---|---|---|" + "---|" * len(items))
            for r in mine:
                print(f"| {r['method']} | {r['run']} | {r['variant']} | {_gb(sum(r['items'].values()))} | "
                      + " | ".join(_gb(r["items"][i]) if i in r["items"] else "-" for i in items) + " |")
    print("\nweights alone: " + ", ".join(f"{k} {v[0] * 2 / 1e9:.0f} GB in bf16" for k, v in CHECKPOINTS.items()))
    print(f"\nassumptions: {ANSWER_TOKENS} cached rows per fact; activations {ACT_HIDDEN}*hidden + {ACT_INTER}*intermediate "
          "elements per token and layer; GB = 1e9 bytes; BP step = the step's cached rows, Cholesky factors and "
          "shifts (training keeps them for the meta-gradient) plus the module being solved")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
