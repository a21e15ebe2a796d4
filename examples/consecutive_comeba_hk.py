"""Consecutive COMEBA-HK: K batches of facts edited one after another into hook layers, then undone exactly.

COMEBA-HK needs no training: each batch is a MEMIT-style update that lands in hook layers beside
the MLP output projections (the model's own weights are never written) and accumulates with the
batches before it. The script calls ``apply_comeba_hk_to_model`` once per batch, the call EasyEdit's
``BaseEditor.batch_edit(..., sequential_edit=True)`` makes per chunk once the plugin is registered.
It then

* scores all edited facts: reliability and generality (teacher-forced token accuracy on the edit
  prompts and their rephrases) and locality (agreement with the unedited model's predictions on
  unrelated questions), as in the COMEBA-HK paper;
* saves the hook state (``save_hook_state``: safetensors + JSON), removes it with
  ``remove_hook_layers`` and checks that the model's outputs and parameters are bit-identical to the
  original's;
* loads the saved state into a freshly loaded copy of the model (``load_hook_state``) and checks
  that it reproduces the edited model's outputs exactly.

Prints the metrics before and after editing and one line per check ("restored exactly: True");
writes everything as JSON (``--out``).

    python examples/consecutive_comeba_hk.py --batches 3 --batch-size 5 --z-steps 8 --cov-samples 200
    python examples/consecutive_comeba_hk.py --model tiny-smollm2 --batches 2 --batch-size 2 --z-steps 2 \
        --cov-samples 20 --out /tmp/comeba.json                        # seconds, random model
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from example_utils import add_model_argument, load_model, load_sample, scores, table

from smedit_plugin.comeba_hk import apply_comeba_hk_to_model, load_hook_state, remove_hook_layers, save_hook_state
from smedit_plugin.hparams import load_method_hparams
from smedit_plugin.records import sample_path
from smedit_plugin.requests import to_requests
from smedit_plugin.devices import model_input_device
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference
from smedit_plugin.fileio import write_json_atomic

METHOD = "COMEBA-HK"
COLUMNS = {"efficacy": "reliability %", "generalization": "generality %", "specificity": "locality %"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--eval-data", type=Path, default=sample_path("zsre_sample_eval"),
                        help="ZsRE records to edit (the first batches * batch-size)")
    parser.add_argument("--batches", type=int, default=3, help="K, consecutive batches (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=5, help="facts per batch (default: %(default)s)")
    parser.add_argument("--z-steps", type=int, default=None,
                        help="gradient steps per target value (default: the YAML's v_num_grad_steps)")
    parser.add_argument("--cov-samples", type=int, default=None,
                        help="WikiText-2 samples for the key covariance (default: the YAML's mom2_n_samples)")
    parser.add_argument("--stats-dir", type=Path, default=None,
                        help="covariance cache folder (default: in the smedit cache)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where to save the hook state (default: <out without .json>_hook_state)")
    parser.add_argument("--out", type=Path, default=Path("consecutive_comeba_hk.json"), help="JSON result file")
    return parser.parse_args()


@torch.no_grad()
def outputs(model: torch.nn.Module, tok: Any, texts: Sequence[str]) -> list[torch.Tensor]:
    """Logits of each text on its own (no padding), to compare models position by position."""
    device = model_input_device(model)
    return [model(**tok(text, return_tensors="pt").to(device)).logits for text in texts]


def max_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def identical(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    args = parse_args()
    model, tok, key = load_model(args.model)
    changes: dict[str, Any] = {"batch_size": args.batch_size}
    if args.z_steps:
        changes["v_num_grad_steps"] = args.z_steps
    if args.cov_samples:
        changes["mom2_n_samples"] = args.cov_samples
    if args.stats_dir:
        changes["stats_dir"] = str(args.stats_dir)
    hp = load_method_hparams(METHOD, key, training=False).replace(**changes)
    records = load_sample(args.eval_data, args.batches * args.batch_size, "--batches * --batch-size")
    probes = [r.prompt for r in records] + [p for r in records for p in r.locality_prompts]

    reference = predict_locality_reference(model, tok, records)
    before = evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                              progress=False)
    original_outputs = outputs(model, tok, probes)
    original_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    seconds = []
    for number, start in enumerate(range(0, len(records), args.batch_size), start=1):
        batch = records[start:start + args.batch_size]
        tick = time.perf_counter()
        apply_comeba_hk_to_model(model, tok, to_requests(batch), hp)
        seconds.append(time.perf_counter() - tick)
        print(f"batch {number}/{args.batches}: {len(batch)} facts edited in {seconds[-1]:.1f} s")
    after = evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                             progress=False)
    edited_outputs = outputs(model, tok, probes)
    changed_by = max_difference(edited_outputs, original_outputs)

    state_dir = args.state_dir or args.out.with_name(f"{args.out.stem}_hook_state")
    save_hook_state(model, state_dir)
    remove_hook_layers(model)
    params = dict(model.named_parameters())
    restored = (identical(outputs(model, tok, probes), original_outputs) and set(params) == set(original_params)
                and all(torch.equal(params[n], p) for n, p in original_params.items()))

    fresh, _, _ = load_model(args.model)
    load_hook_state(fresh, state_dir)
    reloaded_outputs = outputs(fresh, tok, probes)
    reloaded = identical(reloaded_outputs, edited_outputs)

    print(f"\n{METHOD} on {args.model}: {len(records)} facts in {args.batches} consecutive batches of "
          f"{args.batch_size}, {sum(seconds):.1f} s of editing")
    print(table([("before editing", before), (f"after {args.batches} batches", after)], COLUMNS))
    print(f"\nhooks attached: max |logit change| on {len(probes)} probe prompts = {changed_by:.4g}")
    print(f"after remove_hook_layers: outputs and parameters restored exactly: {restored}")
    print(f"hook state saved to {state_dir} and loaded into a fresh model: edited outputs reproduced exactly: "
          f"{reloaded} (max |diff| {max_difference(reloaded_outputs, edited_outputs):.3g})")
    write_json_atomic(args.out, {
        "method": METHOD, "model": args.model, "batches": args.batches, "batch_size": args.batch_size,
        "edit_seconds_per_batch": seconds, "before": scores(before), "after": scores(after),
        "max_logit_change_while_hooked": changed_by, "restored_exactly": restored, "state_dir": str(state_dir),
        "reloaded_exactly": reloaded,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
