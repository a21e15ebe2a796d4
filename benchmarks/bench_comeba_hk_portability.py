"""Where COMEBA-HK's portability loss comes from: which prompts the hooks fire on, at which layers (issue 29, point 7).

After ``--n-edits`` consecutive ZsRE edits (or a state loaded with ``--state``), every probe of the
edited records is run one at a time, teacher-forced exactly as the metrics score it (prompt + answer
but its last token), and each hook layer's scope decision is recomputed from its own state
(``||delta_w k||`` z-scores against ``alpha``, padding and BOS masked). Reported:

* per probe type (edit prompt, rephrase, portability question, locality question) and per layer:
  the share of probes with any swapped token, with the subject's last token swapped, and the share
  of all tokens swapped;
* portability (PS, token accuracy of the one-hop answer) unedited (every hook off), edited, with
  each hook layer switched off in turn, and with only one layer on;
* the portability questions split by where the hooks fired (the subject's last token / other
  tokens only / nowhere), with each group's share of the PS change. A probe on which no hook fires
  is scored exactly as unedited, so every point of PS lost comes from a probe where some token
  was swapped;
* "leak": on the portability questions, the token accuracy of the edit's new target (the edited
  fact's object) instead of the one-hop answer, unedited vs edited.

When it edits (no ``--state``) it also reports each round's wall and CPU seconds and RSS, and the
records' reliability, generality, locality (agreement with the unedited model) and portability.

    python benchmarks/bench_comeba_hk_portability.py --n-edits 200 --save-state hk200 --out portability.json
    python benchmarks/bench_comeba_hk_portability.py --state hk200 --n-edits 200 --out portability.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model, load_hook_state, save_hook_state  # noqa: E402
from smedit_plugin.comeba_hk.hook_layers import HOOK_ATTR, HookLayer  # noqa: E402
from smedit_plugin.comeba_hk.state import find_state  # noqa: E402
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference, score_answers  # noqa: E402
from smedit_plugin.hparams import load_method_hparams  # noqa: E402
from smedit_plugin.memory import reset_peak, status_mb  # noqa: E402
from smedit_plugin.models import load_model_and_tokenizer  # noqa: E402
from smedit_plugin.records import EditRecord, load_zsre  # noqa: E402
from smedit_plugin.requests import to_requests  # noqa: E402
from smedit_plugin.text import collate, encode_pairs, pad_token_id  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval.json"
PROBES = ("edit", "rephrase", "portability", "locality")


def probes(record: EditRecord) -> dict[str, list[tuple[str, str]]]:
    """Every (prompt, teacher-forced answer) pair of a record, by probe type, as the metrics score them."""
    return {"edit": [(record.prompt, record.target_new)],
            "rephrase": [(p, record.target_new) for p in record.rephrase_prompts],
            "portability": list(zip(record.portability_prompts, record.portability_answers)),
            "locality": list(zip(record.locality_prompts, record.locality_answers))}


def subject_last_token(tok: Any, prompt: str, subject: Optional[str]) -> Optional[int]:
    """Index of the last token overlapping the subject's last occurrence in ``prompt`` (None if absent)."""
    if not subject:
        return None
    at = prompt.lower().rfind(subject.lower())
    if at < 0:
        return None
    end = at + len(subject)
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (lo, hi) in enumerate(offsets) if hi > lo and lo < end and hi > at]
    return inside[-1] if inside else None


class SwapRecorder:
    """Recomputes every hook layer's swap mask on each forward (the same test the hook applies)."""

    def __init__(self, layers: list[HookLayer], modules: list[nn.Module]) -> None:
        self.layers = layers
        self.masks: list[Optional[torch.Tensor]] = [None] * len(layers)
        self.handles = [module.register_forward_hook(self._hook(k)) for k, module in enumerate(modules)]

    def _hook(self, k: int):
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
            layer = self.layers[k]
            if layer.mode != "validated":
                self.masks[k] = None
                return
            self.masks[k] = layer.swapped(layer.shift(args[0])).reshape(-1, args[0].shape[-2])[0].cpu()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def swap_statistics(model: nn.Module, tok: Any, records: list[EditRecord], recorder: SwapRecorder
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per probe: for each layer, whether any token / the subject's last token was swapped, and how many tokens."""
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in PROBES}
    pad = pad_token_id(tok)
    for index, record in enumerate(records):
        for kind, pairs in probes(record).items():
            for prompt, answer in pairs:
                batch = collate(encode_pairs(tok, [prompt], [answer]), pad)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                subject_at = subject_last_token(tok, prompt, record.subject)
                layers = []
                for mask in recorder.masks:
                    if mask is None:
                        layers.append({"any": False, "subject": False, "tokens": 0})
                        continue
                    layers.append({"any": bool(mask.any()), "tokens": int(mask.sum()),
                                   "subject": bool(subject_at is not None and subject_at < mask.numel()
                                                   and mask[subject_at])})
                out[kind].append({"record": index, "n_tokens": int(batch["input_ids"].shape[1]),
                                  "has_subject": subject_at is not None, "layers": layers})
    return out


def portability_scores(model: nn.Module, tok: Any, records: list[EditRecord], answers: str = "gold"
                       ) -> list[Optional[float]]:
    """Per record: mean token accuracy over its portability questions (``answers="target"``: of the edit's new target)."""
    prompts, targets, owner = [], [], []
    for index, record in enumerate(records):
        for prompt, answer in zip(record.portability_prompts, record.portability_answers):
            prompts.append(prompt)
            targets.append(answer if answers == "gold" else record.target_new)
            owner.append(index)
    scored = score_answers(model, tok, prompts, targets)
    per: list[list[float]] = [[] for _ in records]
    for index, item in zip(owner, scored):
        per[index].append(item.accuracy)
    return [sum(v) / len(v) if v else None for v in per]


def _mean(values: list[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _set_modes(layers: list[HookLayer], on: list[bool]) -> None:
    for layer, flag in zip(layers, on):
        layer.mode = "validated" if flag else "off"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n-edits", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--state", type=Path, default=None, help="load this saved COMEBA-HK state instead of editing")
    parser.add_argument("--save-state", type=Path, default=None, help="save the state after editing")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--edit-only", action="store_true", help="edit, time and score, but skip the portability analysis")
    parser.add_argument("--out", type=Path, default=Path("bench_comeba_hk_portability.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    records = load_zsre(args.data, limit=args.n_edits)
    tick = time.perf_counter()
    rounds: list[dict[str, float]] = []
    quality: Optional[dict[str, Any]] = None
    if args.state is not None:
        load_hook_state(model, args.state)
    else:
        reference = predict_locality_reference(model, tok, records)
        hp = load_method_hparams("COMEBA-HK", args.model)
        requests = to_requests(records)
        for start in range(0, len(requests), args.batch_size):
            reset_peak()  # the round's own peak RSS
            wall, cpu = time.perf_counter(), time.process_time()
            apply_comeba_hk_to_model(model, tok, requests[start:start + args.batch_size], hp)
            rounds.append({"round": len(rounds) + 1, "seconds": time.perf_counter() - wall,
                           "cpu_seconds": time.process_time() - cpu, "peak_rss_mb": status_mb("VmHWM"),
                           "rss_after_mb": status_mb("VmRSS")})
            print(json.dumps(rounds[-1]), flush=True)
        if args.save_state is not None:
            save_hook_state(model, args.save_state, overwrite=True)
        scored = evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                                  progress=False)
        quality = {"reliability": scored["efficacy"], "generality": scored["generalization"],
                   "locality": scored["specificity"], "portability": scored["portability"]}
        quality["average"] = (quality["reliability"] + quality["generality"] + quality["locality"]) / 3
        print(json.dumps(quality), flush=True)
    edit_seconds = time.perf_counter() - tick
    if args.edit_only:
        steady = [r["seconds"] for r in rounds[9:20]]
        args.out.write_text(json.dumps({"model": args.model, "n_edits": len(records), "rounds": rounds,
                                        "quality": quality, "threads": torch.get_num_threads(),
                                        "median_round_seconds_10_20": statistics.median(steady) if steady else None},
                                       indent=2) + "\n")
        return
    controller = find_state(model)
    names = controller.info["rewrite_modules"]
    modules = [model.get_submodule(name) for name in names]
    layers: list[HookLayer] = [getattr(m, HOOK_ATTR) for m in modules]
    layer_ids = list(controller.info["layers"])
    n = len(layers)

    scores: dict[str, list[Optional[float]]] = {}
    _set_modes(layers, [False] * n)
    scores["unedited"] = portability_scores(model, tok, records)
    scores["unedited_target"] = portability_scores(model, tok, records, answers="target")
    _set_modes(layers, [True] * n)
    scores["edited"] = portability_scores(model, tok, records)
    scores["edited_target"] = portability_scores(model, tok, records, answers="target")
    for k in range(n):
        _set_modes(layers, [j != k for j in range(n)])
        scores[f"without_layer_{layer_ids[k]}"] = portability_scores(model, tok, records)
        _set_modes(layers, [j == k for j in range(n)])
        scores[f"only_layer_{layer_ids[k]}"] = portability_scores(model, tok, records)
    _set_modes(layers, [True] * n)
    recorder = SwapRecorder(layers, modules)
    try:
        swaps = swap_statistics(model, tok, records, recorder)
    finally:
        recorder.remove()

    rates: dict[str, Any] = {}
    for kind, rows in swaps.items():
        if not rows:
            continue
        entry: dict[str, Any] = {"probes": len(rows), "with_subject": sum(r["has_subject"] for r in rows)}
        for k in range(n):
            entry[f"layer_{layer_ids[k]}"] = {
                "any_swap": sum(r["layers"][k]["any"] for r in rows) / len(rows),
                "subject_swap": sum(r["layers"][k]["subject"] for r in rows) / len(rows),
                "token_share": sum(r["layers"][k]["tokens"] for r in rows) / sum(r["n_tokens"] for r in rows)}
        entry["any_layer"] = {"any_swap": sum(any(x["any"] for x in r["layers"]) for r in rows) / len(rows),
                              "subject_swap": sum(any(x["subject"] for x in r["layers"]) for r in rows) / len(rows)}
        rates[kind] = entry

    # portability questions grouped by where the hooks fired (a record's questions pooled)
    fired: dict[int, str] = {}
    for row in swaps["portability"]:
        where = ("subject" if any(x["subject"] for x in row["layers"])
                 else "other tokens only" if any(x["any"] for x in row["layers"]) else "nowhere")
        rank = {"nowhere": 0, "other tokens only": 1, "subject": 2}
        if rank[where] >= rank[fired.get(row["record"], "nowhere")]:
            fired[row["record"]] = where
    groups: dict[str, Any] = {}
    total_change = sum((e - u) for e, u in zip(scores["edited"], scores["unedited"]) if e is not None and u is not None)
    for where in ("subject", "other tokens only", "nowhere"):
        idx = [i for i, g in fired.items() if g == where and scores["edited"][i] is not None]
        change = sum(scores["edited"][i] - scores["unedited"][i] for i in idx)
        groups[where] = {"records": len(idx), "ps_unedited": _mean([scores["unedited"][i] for i in idx]),
                         "ps_edited": _mean([scores["edited"][i] for i in idx]),
                         "share_of_ps_change": change / total_change if total_change else None,
                         "target_accuracy_unedited": _mean([scores["unedited_target"][i] for i in idx]),
                         "target_accuracy_edited": _mean([scores["edited_target"][i] for i in idx])}
    worse = [i for i in range(len(records)) if scores["edited"][i] is not None
             and scores["edited"][i] < scores["unedited"][i]]
    better = [i for i in range(len(records)) if scores["edited"][i] is not None
              and scores["edited"][i] > scores["unedited"][i]]
    summary = {key: _mean(values) for key, values in scores.items()}
    steady = [r["seconds"] for r in rounds[9:20]]
    result = {"model": args.model, "n_edits": len(records), "layers": layer_ids, "threads": torch.get_num_threads(),
              "alpha": [float(layer.alpha) for layer in layers], "edit_seconds": edit_seconds, "rounds": rounds,
              "median_round_seconds_10_20": statistics.median(steady) if steady else None,
              "median_round_cpu_seconds_10_20": (statistics.median(r["cpu_seconds"] for r in rounds[9:20])
                                                 if steady else None),
              "quality": quality,
              "portability": summary, "swap_rates": rates, "portability_by_where_hooks_fired": groups,
              "records_worse": len(worse), "records_better": len(better),
              "records_worse_with_target_gain": sum(scores["edited_target"][i] > scores["unedited_target"][i]
                                                    for i in worse),
              "per_record": scores}
    print(f"{args.model}: {len(records)} consecutive COMEBA-HK edits, layers {layer_ids}, "
          f"alpha {[round(a, 2) for a in result['alpha']]}")
    if quality is not None:
        print("  " + ", ".join(f"{key} {value:.3f}" for key, value in quality.items())
              + f"; median round {result['median_round_seconds_10_20']} s (rounds 10-20)")
    print("\nportability (PS, token accuracy of the one-hop answer) and the edit target's accuracy on the same questions")
    for key in ("unedited", "edited", *[f"without_layer_{i}" for i in layer_ids], *[f"only_layer_{i}" for i in layer_ids]):
        print(f"  {key:<22}{100 * summary[key]:6.1f}")
    print(f"  new target on the portability questions: unedited {100 * summary['unedited_target']:.1f}, "
          f"edited {100 * summary['edited_target']:.1f}")
    print("\nswap rates (share of probes with any swapped token / with the subject's last token swapped)")
    print(f"  {'probe':<13}" + "".join(f"{'L' + str(i):>14}" for i in layer_ids) + f"{'any layer':>14}")
    for kind, entry in rates.items():
        cells = [entry[f"layer_{i}"] for i in layer_ids] + [entry["any_layer"]]
        print(f"  {kind:<13}" + "".join(f"{100 * c['any_swap']:6.1f}/{100 * c['subject_swap']:5.1f} " for c in cells))
    print("\nportability questions by where the hooks fired")
    for where, g in groups.items():
        if g["records"]:
            print(f"  {where:<18} {g['records']:4d} records  PS {100 * g['ps_unedited']:5.1f} -> {100 * g['ps_edited']:5.1f}"
                  f"  new-target acc {100 * g['target_accuracy_unedited']:5.1f} -> {100 * g['target_accuracy_edited']:5.1f}"
                  f"  share of the PS change {g['share_of_ps_change'] if g['share_of_ps_change'] is None else round(g['share_of_ps_change'], 2)}")
    print(f"  records worse {len(worse)}, better {len(better)}; of the worse, new target more likely: "
          f"{result['records_worse_with_target_gain']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
