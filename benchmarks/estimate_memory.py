"""Estimated peak memory of each method on each large-model YAML (no GPU here, so counted, not measured).

Counts the tensors the code holds at its peak, from the shipped YAML and the architecture's sizes:
model weights, the method's state and copies, the largest temporaries, and a rough activation term.
Assumptions (printed with the table): ``ANSWER_TOKENS`` cached rows per fact, activations of
``ACT_BYTES_PER_TOKEN_LAYER`` elements per token and layer, the COMEBA-HK z optimisation at its
chunk of facts with every context template. GB = 1e9 bytes.

    python benchmarks/estimate_memory.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

from smedit_plugin.hparams import load_hparams
from smedit_plugin.models import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
#: Parameters and vocabulary of the hub checkpoints the large YAMLs name (model cards).
CHECKPOINTS = {"llama3-8b": (8.03e9, 128256, 1024), "gemma-2": (9.24e9, 256000, 2048), "gpt-j-6b": (6.05e9, 50400, 4096)}
#: Cached rows (answer tokens) per edited fact, ZsRE-like targets.
ANSWER_TOKENS = 5
#: Saved activation elements per token and layer for a backward pass, in units of (hidden, intermediate).
ACT_HIDDEN, ACT_INTER = 12, 4
HYPERNET = ("SMEdit", "MALMEN2", "MALMEN1", "RLEdit2", "RLEdit1")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _shapes(arch, names: list[str]) -> list[tuple[int, int]]:
    """(d_in, d_out) of each edit module, from its role in the architecture table."""
    shapes = []
    for name in names:
        role = next(r for r, t in arch.modules.items() if "{i}" in t and name.endswith(t.split("{i}")[-1]))
        widening = role in ("gate", "up", "fc_in")
        shapes.append((arch.hidden_size, arch.intermediate_size) if widening
                      else (arch.intermediate_size, arch.hidden_size))
    return shapes


def _activations(arch, tokens: int, layers: int, b: int) -> float:
    return tokens * layers * (ACT_HIDDEN * arch.hidden_size + ACT_INTER * arch.intermediate_size) * b


def hypernet(key: str, hp, training: bool) -> dict[str, float]:
    arch = ARCHITECTURES[key]
    params, vocab, _ = CHECKPOINTS[key]
    b = BYTES[hp.model_dtype or "float32"]
    shapes = _shapes(arch, hp.edit_modules)
    edited = sum(i * o for i, o in shapes)
    groups = {s: shapes.count(s) for s in shapes}
    nets = 1 if hp.shared_hypernet_for(hp.num_seq) else hp.bp_steps
    ranks = hp.step_ranks(hp.num_seq)[:nets]
    net_params = sum(hp.n_blocks * (2 * (i + o) * r + (i + o) * (1 + 2 * n)) + 4 * (i + o)
                     for (i, o), n in groups.items() for r in ranks)
    facts = hp.n_edits if training else hp.batch_size
    rows = facts * ANSWER_TOKENS
    cached = sum(rows * (i + o) * 4 for i, o in shapes)  # keys | value grads of every module, float32
    solvers = [rows * i * 4 + min(rows, i) ** 2 * 4 for i, _ in shapes]  # keys and the factored ridge system
    # editing drops each module's rows and solver once its shift is in; training keeps them for the meta-gradient
    caches = hp.bp_steps * (cached + sum(solvers)) if training else cached + max(solvers)
    fp32_copies = (4 if b < 4 else 0) * edited
    tokens = hp.micro_batch_size * hp.max_length
    parts = {"weights": params * b, "snapshot": edited * b, "fp32 edit weights": fp32_copies,
             "hypernetwork": net_params * 4 * (4 if training else 1),
             "cached rows": caches,
             "activations": _activations(arch, tokens, arch.n_layers, b) + tokens * vocab * 4 * 2}
    if training:
        parts["weight grads"] = edited * 4
    return parts


def locate(key: str, hp, via_easyedit: bool) -> dict[str, float]:
    arch = ARCHITECTURES[key]
    params, vocab, kv = CHECKPOINTS[key]
    b = BYTES[hp.model_dtype or "float32"]
    m = BYTES[hp.mom2_dtype]
    f, d, n_layers = arch.intermediate_size, arch.hidden_size, len(hp.layers)
    hooks = hp.alg_name == "COMEBA-HK"
    n_templates = 1 + sum(n for _, n in hp.context_template_length_params)
    facts = min(hp.z_chunk_size or hp.batch_size, hp.batch_size)
    prompt_tokens = facts * (n_templates + 1) * (max(l for l, _ in hp.context_template_length_params) + 20)
    upper = max(hp.v_loss_layer, hp.layers[-1]) - hp.layers[-1]
    parts = {"weights": params * b,
             "C_accu": n_layers * f * f * m,
             "delta_w + its snapshot" if hooks else "weight snapshot": n_layers * d * f * (8 if hooks else b),
             "update system + factor": 2 * f * f * 8,
             "z optimisation": prompt_tokens * arch.n_layers * 2 * kv * b  # KV cache of every prompt
             + _activations(arch, facts * n_templates * 8, upper, b) + facts * n_templates * 4 * vocab * 4 * 3}
    if via_easyedit:
        parts["C_accu copy (weights_copy)"] = n_layers * f * f * m
    if not hooks and b < 4:
        parts["fp32 edit weights"] = n_layers * d * f * 4
    return parts


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    rows = []
    for key in CHECKPOINTS:
        for method in HYPERNET:
            for sub, training in ((method, False), (f"TRAINING/{method}", True)):
                for path in sorted((ROOT / "hparams" / sub).glob(f"{key}*.yaml")):
                    hp = load_hparams(str(path))
                    rows.append((key, method, "train" if training else "edit", path.stem, hypernet(key, hp, training)))
        for method in ("COMEBA-HK", "MEMIT-C"):
            hp = load_hparams(f"{method}/{key}")
            rows.append((key, method, "step", key, locate(key, hp, via_easyedit=False)))
            rows.append((key, method, "step via EasyEdit", key, locate(key, hp, via_easyedit=True)))
    keys = list(CHECKPOINTS)
    table: dict[tuple[str, str, str], dict[str, str]] = {}
    for key, method, run, stem, parts in rows:
        variant = stem[len(key):].lstrip("-") or "default"
        total = sum(parts.values()) / 1e9
        top = max((k for k in parts if k != "weights"), key=parts.get)
        table.setdefault((method, run, variant), {})[key] = f"{total:.0f} ({top} {parts[top] / 1e9:.1f})"
    print("| method | run | YAML | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for (method, run, variant), cells in table.items():
        print(f"| {method} | {run} | {variant} | " + " | ".join(cells.get(k, "-") for k in keys) + " |")
    print("\nweights alone: " + ", ".join(f"{k} {v[0] * 2 / 1e9:.0f} GB in bf16" for k, v in CHECKPOINTS.items()))
    print(f"\nassumptions: {ANSWER_TOKENS} cached rows per fact; activations {ACT_HIDDEN}*hidden + {ACT_INTER}*intermediate "
          "elements per token and layer; GB = 1e9 bytes")


if __name__ == "__main__":
    main()
