"""``smedit train``, ``smedit demo`` and ``smedit compare`` (registered in :data:`smedit_plugin.cli.COMMANDS`)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .cli import Runner

# --------------------------------------------------------------------------------------------
# smedit train
# --------------------------------------------------------------------------------------------


def setup_train(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("hparams", help="a TRAINING yaml, e.g. hparams/TRAINING/SMEdit/smollm2-135m.yaml")
    parser.add_argument("--data", required=True, help="training records (ZsRE or CounterFact JSON)")
    parser.add_argument("--val-data", default=None, help="validation records (ES/GS/LS every val_interval units)")
    parser.add_argument("--out", required=True, type=Path, help="archive directory to write (resumed if it exists)")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps (training batches or sequences)")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default=None)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    return run_train


def run_train(args: argparse.Namespace) -> int:
    from .data import detect_dataset, load_records
    from .hparams import load_hparams
    from .hypernet.hparams import HypernetHyperParams
    from .hypernet.workflow import train_hypernet
    from .models import load_model_and_tokenizer

    hp = load_hparams(args.hparams)
    if not isinstance(hp, HypernetHyperParams):
        raise ValueError(f"{args.hparams}: {hp.alg_name} has no hypernetwork to train")
    if args.max_steps is not None:
        hp = hp.replace(max_steps=args.max_steps)
    dataset = args.dataset or detect_dataset(Path(args.data))
    train = load_records(Path(args.data), dataset)
    val = load_records(Path(args.val_data), dataset) if args.val_data else None
    model, tok = load_model_and_tokenizer(hp.model_name, dtype=hp.model_dtype or ("float16" if hp.fp16 else None),
                                          device=hp.device)
    result = train_hypernet(model, tok, hp, train, args.out, val_records=val, dataset=dataset,
                            resume=not args.no_resume, progress=not args.no_progress)
    print(f"trained {hp.alg_name} on {result.edits_seen} edits in {result.train_seconds:.1f} s "
          f"({result.seconds_per_edit:.3f} s/edit, {result.state.optimizer_steps} optimiser steps); archive: {result.archive}")
    for entry in result.state.history:
        if "val" in entry or "final_val" in entry:
            print(f"  after unit {entry['unit']}: {entry.get('val') or entry.get('final_val')}")
    return 0


# --------------------------------------------------------------------------------------------
# smedit demo
# --------------------------------------------------------------------------------------------


def setup_demo(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--method", default="SMEdit", choices=("SMEdit", "MALMEN2", "MALMEN1"))
    parser.add_argument("--n-edits", type=int, default=24, help="unseen facts edited in one batch (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("demo_results.json"), help="JSON result file (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached archive")
    parser.add_argument("--no-progress", action="store_true")
    return run_demo


@torch.no_grad()
def greedy_answers(model, tok, prompts: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The model's greedy continuation of each prompt, at least as many tokens as the target, first line only."""
    from .devices import model_input_device
    from .text import answer_text

    device = model_input_device(model)
    out = []
    for prompt, target in zip(prompts, targets):
        ids = tok(prompt, return_tensors="pt").to(device)
        n_target = len(tok(answer_text(target), add_special_tokens=False)["input_ids"])
        # an instruct model often ends a bare question with EOS at once; ask for a target-length answer
        gen = model.generate(**ids, min_new_tokens=n_target, max_new_tokens=n_target + 2, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append(text.split("\n")[0].strip())
    return out


def run_demo(args: argparse.Namespace) -> int:
    from .compare import hparams_dir, method_hparams
    from .data import load_records, sample_path, to_requests
    from .evaluation import evaluate_records
    from .fileio import write_json_atomic
    from .hypernet.workflow import train_hypernet
    from .models import cache_dir, load_model_and_tokenizer
    from .registry import method_spec

    model_key = "smollm2-135m"
    train_hp = method_hparams(args.method, model_key, training=True)
    train = load_records(sample_path("zsre_sample"), "zsre")
    evaluation = load_records(sample_path("zsre_sample_eval"), "zsre")[: args.n_edits]
    if len(evaluation) < args.n_edits:
        raise ValueError(f"--n-edits {args.n_edits} exceeds the {len(evaluation)} packaged evaluation records")
    model, tok = load_model_and_tokenizer(model_key)
    archive = cache_dir() / "archives" / f"demo-{args.method}-{model_key}"
    trained_now = args.retrain or not (archive / "meta.json").is_file()
    if trained_now:
        result = train_hypernet(model, tok, train_hp, train, archive, model_name=model_key, resume=False,
                                progress=not args.no_progress)
        print(f"trained {args.method} on {result.edits_seen} packaged ZsRE facts in {result.train_seconds:.0f} s")
    else:
        print(f"reusing the trained {args.method} archive at {archive} (--retrain to train again)")
    edit_hp = method_hparams(args.method, model_key, training=False, root=hparams_dir()).replace(archive=str(archive))
    prompts = [r.prompt for r in evaluation]
    targets = [r.target_new for r in evaluation]
    before = greedy_answers(model, tok, prompts, targets)
    pre = evaluate_records(model, tok, evaluation, dataset="zsre", progress=False)
    start = time.perf_counter()
    apply = method_spec(args.method).apply_function()
    model, weights_copy = apply(model, tok, to_requests(evaluation), edit_hp, return_orig_weights=True,
                                keep_original_weight=True)
    edit_seconds = time.perf_counter() - start
    after = greedy_answers(model, tok, prompts, targets)
    post = evaluate_records(model, tok, evaluation, dataset="zsre", progress=False)
    rows = [{"prompt": p, "target_new": t, "before": b, "after": a} for p, t, b, a in zip(prompts, targets, before, after)]
    print(_answers_table(rows))
    print()
    print(f"{'':<16}{'ES %':>8}{'GS %':>8}{'LS %':>8}")
    for label, m in (("before edit", pre), (f"after {args.method}", post)):
        print(f"{label:<16}" + "".join(f"{100 * m[k]:>8.1f}" for k in ("efficacy", "generalization", "specificity")))
    print(f"edited {len(rows)} facts in one batch in {edit_seconds:.1f} s")
    keys = ("efficacy", "generalization", "specificity")
    write_json_atomic(args.out, {"method": args.method, "model": model_key, "n_edits": len(rows),
                                 "trained_now": trained_now, "archive": str(archive), "edit_seconds": edit_seconds,
                                 "before": {k: pre[k] for k in keys}, "after": {k: post[k] for k in keys},
                                 "answers": rows})
    print(f"wrote {args.out}")
    with torch.no_grad():
        for name, tensor in weights_copy.items():
            model.get_parameter(name).copy_(tensor)
    return 0


def _answers_table(rows: list[dict[str, Any]], width: int = 44) -> str:
    cut = lambda s, w: s if len(s) <= w else s[: w - 1] + "…"
    head = f"{'prompt':<{width}}  {'new target':<20}  {'answer before':<20}  {'answer after':<20}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{cut(r['prompt'], width):<{width}}  {cut(r['target_new'], 20):<20}  "
                     f"{cut(r['before'], 20):<20}  {cut(r['after'], 20):<20}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# smedit compare
# --------------------------------------------------------------------------------------------


def setup_compare(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--train-data", type=Path, default=None)
    parser.add_argument("--eval-data", type=Path, required=True)
    parser.add_argument("--methods", default="SMEdit,MALMEN2,MALMEN1", help="comma-separated: plugin methods and easyedit:<METHOD> for EasyEdit's own (e.g. easyedit:FT); "
                             "METHOD[field=value,...] runs a variant with hparams overrides (e.g. SMEdit[reg_coef=0])")
    parser.add_argument("--protocol", choices=("batch", "sequential", "consecutive", "single-round"), default="batch",
                        help="batch/sequential: hypernetwork methods; consecutive/single-round: COMEBA-HK, MEMIT-C")
    parser.add_argument("--n-edits", type=int, default=64,
                        help="facts per edit batch (batch, sequential); total facts (consecutive, single-round)")
    parser.add_argument("--batch-size", type=int, default=10,
                        help="facts per step of the consecutive / single-round protocols (default: %(default)s)")
    parser.add_argument("--num-seq", type=int, default=1, help="edit batches that accumulate (sequential protocol)")
    parser.add_argument("--archives", type=Path, default=None, help="where trained archives are kept (default: cache)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="sequential protocol: also re-score all facts edited so far after every K sequences")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a PNG: curves with --curve-every, otherwise bars per method and metric")
    parser.add_argument("--easyedit-hparams", type=Path, default=None,
                        help="folder of EasyEdit YAMLs (METHOD/MODEL.yaml) for easyedit:<METHOD> entries "
                             "(default: the plugin's hparams/EASYEDIT)")
    parser.add_argument("--via-easyedit", action="store_true",
                        help="also run the plugin's methods end to end through EasyEdit's BaseEditor")
    parser.add_argument("--general-every", type=int, default=0,
                        help="general capability (GLUE-style accuracy, perplexity) before editing and after every K "
                             "edit batches and the last one (0 = off)")
    parser.add_argument("--general-items", type=int, default=100, help="items per GLUE-style task (default: %(default)s)")
    parser.add_argument("--general-tokens", type=int, default=4096,
                        help="WikiText-2 tokens for perplexity (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("compare_results.json"))
    parser.add_argument("--no-progress", action="store_true")
    return run_compare_command


def run_compare_command(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, format_general, format_table, parse_methods, plot_results, run_compare
    from .fileio import write_json_atomic

    cfg = CompareConfig(model=args.model, dataset=args.dataset, train_data=args.train_data, eval_data=args.eval_data,
                        methods=parse_methods(args.methods), protocol=args.protocol,
                        n_edits=args.n_edits, num_seq=args.num_seq, batch_size=args.batch_size,
                        archive_root=args.archives, retrain=args.retrain,
                        curve_every=args.curve_every, progress=not args.no_progress,
                        easyedit_hparams=args.easyedit_hparams, via_easyedit=args.via_easyedit,
                        general_every=args.general_every, general_items=args.general_items,
                        general_tokens=args.general_tokens)
    rows = run_compare(cfg)
    print(format_table(rows))
    if cfg.general_every:
        print("\ngeneral capability\n" + format_general(rows))
    write_json_atomic(args.out, rows)
    print(f"wrote {args.out}")
    if args.plot is not None:
        print(f"wrote {plot_results(rows, args.plot)}")
    return 0
