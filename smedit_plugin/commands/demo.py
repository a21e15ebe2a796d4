"""``smedit demo``: edit unseen ZsRE facts into the real SmolLM2-135M and show the answers change.

The default is COMEBA-HK with its demo recipe (``hparams/COMEBA-HK/smollm2-135m-demo.yaml``): it
needs no training, so a fresh machine sees facts change within minutes. The hypernetwork methods
train on the packaged 300 ZsRE training facts first (once; the archive is cached). Facts come from
the packaged evaluation sample, never used to choose any setting; one fact per subject, because
two targets for one question cannot both hold after one batch.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..table import format_table
from .base import Runner

if TYPE_CHECKING:
    import torch

MODEL_KEY = "smollm2-135m"
METRIC_KEYS = ("efficacy", "generalization", "specificity")


def setup(parser: argparse.ArgumentParser) -> Runner:
    from ..methods import DEMO_DEFAULT, METHODS

    parser.add_argument("--method", default=DEMO_DEFAULT, choices=tuple(METHODS),
                        help="method to demonstrate (default: %(default)s, which needs no training)")
    parser.add_argument("--n-edits", type=int, default=8, help="unseen facts edited in one batch (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("demo_results.json"),
                        help="JSON result file (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="hypernetwork methods: ignore the cached archive")
    parser.add_argument("--no-progress", action="store_true")
    return run_demo


def demo_records(n_edits: int) -> list:
    """The first ``n_edits`` packaged evaluation facts with distinct subjects."""
    from ..records import load_records, sample_path

    if n_edits < 1:
        raise ValueError(f"--n-edits must be a positive integer, got {n_edits}")
    chosen, subjects = [], set()
    for record in load_records(sample_path("zsre_sample_eval"), "zsre"):
        if record.subject not in subjects:
            subjects.add(record.subject)
            chosen.append(record)
    if len(chosen) < n_edits:
        raise ValueError(f"--n-edits {n_edits} exceeds the {len(chosen)} packaged evaluation facts with distinct subjects")
    return chosen[:n_edits]


def demo_hparams(method: str) -> tuple[Any, str]:
    """``(hparams, shipped name)``: the method's demo recipe for SmolLM2 if one ships, else its regular YAML."""
    from ..hparams import load_hparams
    from ..shipped import hparams_root, method_yaml

    path = method_yaml(method, MODEL_KEY, variant="-demo")
    return load_hparams(path), path.relative_to(hparams_root()).with_suffix("").as_posix()


def greedy_answers(model: torch.nn.Module, tok: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The model's greedy continuation of each prompt, at least as many tokens as the target, first line only."""
    import torch

    from ..devices import model_input_device
    from ..text import answer_text

    device = model_input_device(model)
    out = []
    with torch.no_grad():
        for prompt, target in zip(prompts, targets):
            ids = tok(prompt, return_tensors="pt").to(device)
            n_target = len(tok(answer_text(target), add_special_tokens=False)["input_ids"])
            # an instruct model often ends a bare question with EOS at once; ask for a target-length answer
            gen = model.generate(**ids, min_new_tokens=n_target, max_new_tokens=n_target + 2, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            out.append(text.split("\n")[0].strip())
    return out


def gives_target(answer: str, target: str) -> bool:
    """Whether a greedy answer starts with the new target (case and surrounding space ignored)."""
    return answer.strip().lower().startswith(target.strip().lower())


def prepare_runner(model: torch.nn.Module, tok: Any, method: str, hp: Any, retrain: bool, progress: bool) -> tuple[Any, float]:
    """``method``'s family runner on the model, prepared: a method that trains does so on the packaged ZsRE training
    facts (once; later runs reuse the cached archive). Returns the runner and the seconds spent training."""
    from ..families import Bench, MethodChoice, Training
    from ..fileio import cache_dir
    from ..hparams import load_method_hparams
    from ..records import load_records, sample_path
    from ..resolve import apply_function, family_runner

    cls = family_runner(method)
    train_hp = load_method_hparams(method, MODEL_KEY, training=True) if cls.trains else None
    runner = cls(Bench(model, tok, MODEL_KEY, "zsre", progress), MethodChoice(method, method, hp, train_hp,
                                                                              apply_function(method)))
    if not cls.trains:
        return runner, 0.0
    data = sample_path("zsre_sample")
    start = time.perf_counter()
    prepared = runner.prepare(Training(load_records(data, "zsre"), data, cache_dir() / "archives", "demo",
                                       retrain=retrain))
    if not prepared.get("trained_now"):
        print(f"reusing the trained {method} archive at {prepared.get('archive')} (--retrain to train again)")
        return runner, 0.0
    seconds = time.perf_counter() - start
    print(f"trained {method} on the packaged ZsRE training facts in {seconds:.0f} s")
    return runner, seconds


def run_demo(args: argparse.Namespace) -> int:
    from ..fileio import check_output_targets, write_json_atomic

    check_output_targets(files={"--out": args.out})
    from ..evaluation import evaluate_records
    from ..gguf_convert import is_converted
    from ..models import load_model_for

    records = demo_records(args.n_edits)
    hp, hp_name = demo_hparams(args.method)
    timings: dict[str, float] = {}
    converted = is_converted(MODEL_KEY)
    start = time.perf_counter()
    model, tok = load_model_for(hp)  # the YAML's model_name, model_dtype, device, model_parallel
    timings["load model" + ("" if converted else " (first run: GGUF conversion)")] = time.perf_counter() - start
    runner, train_seconds = prepare_runner(model, tok, args.method, hp, args.retrain, not args.no_progress)
    if runner.trains:
        timings["train hypernetwork" if train_seconds else "train hypernetwork (cached)"] = train_seconds
    prompts = [r.prompt for r in records]
    targets = [r.target_new for r in records]
    start = time.perf_counter()
    before = greedy_answers(model, tok, prompts, targets)
    pre = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    timings["evaluate before"] = time.perf_counter() - start
    print(f"editing {len(records)} unseen ZsRE facts into {MODEL_KEY} with {args.method} in one batch "
          f"(hparams {hp_name})")
    start = time.perf_counter()
    runner.edit(records)  # through the method's apply function; kept: the process ends after the report
    timings["edit"] = time.perf_counter() - start
    start = time.perf_counter()
    after = greedy_answers(model, tok, prompts, targets)
    post = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    timings["evaluate after"] = time.perf_counter() - start

    rows = [{"prompt": p, "target_new": t, "before": b, "after": a, "gives_target": gives_target(a, t)}
            for p, t, b, a in zip(prompts, targets, before, after)]
    hits = sum(r["gives_target"] for r in rows)
    print(_answers_table(rows))
    print(f"\n{hits} of {len(rows)} edited answers now start with their new target\n")
    print(format_table(["", "ES %", "GS %", "LS %"],
                       [[label] + [f"{100 * m[k]:.1f}" for k in METRIC_KEYS]
                        for label, m in (("before edit", pre), (f"after {args.method}", post))]))
    print("\nES: token accuracy of the new target on the edit prompt; GS: on a rephrasing; LS: unrelated questions")
    print("time: " + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in timings.items()))
    write_json_atomic(args.out, {
        "method": args.method, "model": MODEL_KEY, "hparams": hp_name, "n_edits": len(rows),
        "answers_with_new_target": hits, "before": {k: pre[k] for k in METRIC_KEYS},
        "after": {k: post[k] for k in METRIC_KEYS}, "seconds": timings, "answers": rows})
    print(f"wrote {args.out}")
    return 0


def _answers_table(rows: list[dict[str, Any]]) -> str:
    cut = lambda s, w: s if len(s) <= w else s[: w - 1] + "…"
    lines = [[cut(r["prompt"], 44), cut(r["target_new"], 22), cut(r["before"], 22), cut(r["after"], 22),
              "✓" if r["gives_target"] else ""] for r in rows]
    return format_table(["prompt", "new target", "answer before", "answer after", ""], lines, left=5)
