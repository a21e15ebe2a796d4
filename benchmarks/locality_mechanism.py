"""How far each edited layer's output moves on unrelated prompts, for hook edits and weight edits alike (issue 29).

Explains a locality gap between two consecutive runs with a measurement instead of a guess. Takes a consecutive
``smedit sweep`` folder (for its records and split), the number of facts edited, and saved states of several
methods after those edits: COMEBA-HK or MEMIT-C states (a versioned folder with ``hook_state.json``) and EasyEdit
runner states (``edited.safetensors``, e.g. AlphaEdit). For every probe of the edited records (the edit prompt and
the locality questions, teacher-forced as the metrics score them) and every edited ``down_proj``, with ``k`` the
module's input at a token and ``h = W k`` its unedited output, the edited output moves by

    delta_h = (W_edited - W) k  +  [token swapped] * delta_w k

(the first term is every weight edit, the second COMEBA-HK's hook where its scope test passes). Reported per state,
layer and probe kind: the mean over probes of ``||delta_h|| / ||h||`` over the probe's tokens, the share of tokens
whose output moved by more than 1 % of ``||h||``, COMEBA-HK's share of swapped tokens, and each state's
locality and reliability on these records (token accuracy, locality as agreement with the unedited model).

    python benchmarks/locality_mechanism.py --sweep zsre-1000-alphaedit --n-edits 200 \\
        --state COMEBA-HK=hk200/c-000020 --state AlphaEdit=alpha200/c-000020 --out locality_mechanism.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402

from smedit_plugin.comeba_hk import load_hook_state  # noqa: E402
from smedit_plugin.comeba_hk.hook_layers import HOOK_ATTR, HookLayer  # noqa: E402
from smedit_plugin.comeba_hk.state import remove_hook_layers  # noqa: E402
from smedit_plugin.compare.sweep import records_by_id  # noqa: E402
from smedit_plugin.compare.sweep_cell import load_config  # noqa: E402
from smedit_plugin.easyedit_runs import EDITED_FILE  # noqa: E402
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference  # noqa: E402
from smedit_plugin.hparams import load_method_hparams  # noqa: E402
from smedit_plugin.models import load_model_for  # noqa: E402
from smedit_plugin.records import EditRecord  # noqa: E402
from smedit_plugin.table import format_table  # noqa: E402
from smedit_plugin.text import collate, encode_pairs, pad_token_id  # noqa: E402

KINDS = ("edit", "locality")
#: A token's output counts as moved when ``||delta_h|| > MOVED * ||h||``.
MOVED = 0.01


def probe_pairs(record: EditRecord) -> dict[str, list[tuple[str, str]]]:
    return {"edit": [(record.prompt, record.target_new)],
            "locality": list(zip(record.locality_prompts, record.locality_answers))}


def load_state(model: nn.Module, folder: Path) -> str:
    """Put a saved state into the model; returns its kind (``hooks`` or ``weights``)."""
    if (folder / EDITED_FILE).is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(folder / EDITED_FILE)).items():
                params[name].copy_(value.to(params[name].dtype))
        return "weights"
    load_hook_state(model, folder)
    return "hooks"


class OutputShift:
    """Forward hooks on the rewrite modules that measure ``delta_h`` against the unedited weights ``originals``."""

    def __init__(self, modules: dict[str, nn.Module], originals: dict[str, torch.Tensor]) -> None:
        self.originals = originals
        self.last: dict[str, dict[str, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, _output: Any) -> None:
            keys = args[0][0].float()  # one probe: [tokens, f]
            base = keys @ self.originals[name].t()
            shift = keys @ (module.weight.float() - self.originals[name]).t()
            swapped = torch.zeros(keys.shape[0], dtype=torch.bool)
            layer: Optional[HookLayer] = getattr(module, HOOK_ATTR, None)
            if layer is not None and layer.with_hook and layer.mode == "validated":
                hook_shift = layer.shift(keys)
                swapped = layer.swapped(hook_shift)
                shift = shift + swapped.unsqueeze(-1) * hook_shift
            self.last[name] = {"base": torch.linalg.vector_norm(base, dim=-1),
                               "shift": torch.linalg.vector_norm(shift, dim=-1), "swapped": swapped}
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measure(model: nn.Module, tok: Any, records: list[EditRecord], recorder: OutputShift, bos: Optional[int]
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer and probe kind: mean relative output change, share of moved tokens, share of swapped tokens."""
    pad = pad_token_id(tok)
    acc: dict[str, dict[str, dict[str, list[float]]]] = {
        name: {kind: {"relative": [], "moved": [], "swapped": []} for kind in KINDS} for name in recorder.originals}
    for record in records:
        for kind, pairs in probe_pairs(record).items():
            for prompt, answer in pairs:
                batch = collate(encode_pairs(tok, [prompt], [answer]), pad)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
                if bos is not None and int(batch["input_ids"][0, 0]) == bos:
                    keep[0] = False
                for name, seen in recorder.last.items():
                    base, shift = seen["base"][keep], seen["shift"][keep]
                    out = acc[name][kind]
                    out["relative"].append(float(shift.norm() / base.norm()))
                    out["moved"].append(float((shift > MOVED * base).float().mean()))
                    out["swapped"].append(float(seen["swapped"][keep].float().mean()))
    return {name: {kind: {k: statistics.fmean(v) for k, v in kinds[kind].items()} for kind in KINDS}
            for name, kinds in acc.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a consecutive sweep's --out folder (records, split)")
    parser.add_argument("--n-edits", type=int, required=True, help="the states hold the first this many edit targets")
    parser.add_argument("--state", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a saved state after those edits (repeat for each method)")
    parser.add_argument("--modules", default="model.layers.{}.mlp.down_proj")
    parser.add_argument("--layers", default="2,3,4,5,6")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("locality_mechanism.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    states = []
    for item in args.state:
        label, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise SystemExit(f"--state {item!r}: expected LABEL=FOLDER with an existing folder")
        states.append((label, Path(folder)))
    cfg = load_config(json.loads((args.sweep / "sweep.json").read_text()))
    split = json.loads((args.sweep / "split.json").read_text())
    table, _, _ = records_by_id(cfg)
    records = [table[i] for i in split["edit_pool"][:args.n_edits]]
    model, tok = load_model_for(load_method_hparams("COMEBA-HK", cfg.model))  # the model the sweep's plugin cells load
    model.eval()
    names = [args.modules.format(int(n)) for n in args.layers.split(",")]
    modules = {name: model.get_submodule(name) for name in names}
    originals = {name: m.weight.detach().float().clone() for name, m in modules.items()}
    reference = predict_locality_reference(model, tok, records)
    bos = tok.bos_token_id
    results = []
    for label, folder in states:
        kind = load_state(model, folder)
        scored = evaluate_records(model, tok, records, dataset=cfg.dataset, locality="agreement",
                                  reference=reference, progress=False)
        recorder = OutputShift(modules, originals)
        try:
            per_layer = measure(model, tok, records, recorder, bos)
        finally:
            recorder.remove()
            remove_hook_layers(model)
            with torch.no_grad():
                for name, m in modules.items():
                    m.weight.copy_(originals[name].to(m.weight.dtype))
        results.append({"state": label, "folder": str(folder), "kind": kind, "reliability": scored["efficacy"],
                        "locality": scored["specificity"], "layers": per_layer})
        print(json.dumps({k: results[-1][k] for k in ("state", "kind", "reliability", "locality")}), flush=True)
    rows = []
    for r in results:
        for name in names:
            layer = r["layers"][name]
            rows.append([r["state"], name.split(".")[2]]
                        + [f"{layer[kind]['relative']:.4f}" for kind in KINDS]
                        + [f"{layer[kind]['moved']:.3f}" for kind in KINDS]
                        + [f"{layer['locality']['swapped']:.3f}", f"{r['locality']:.3f}"])
    print(format_table(["state", "layer", "edit |dh|/|h|", "locality |dh|/|h|", "edit moved", "locality moved",
                        "locality swapped", "locality score"], rows))
    args.out.write_text(json.dumps({"sweep": str(args.sweep), "n_edits": args.n_edits, "modules": names,
                                    "moved_threshold": MOVED, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
