"""COMEBA-HK on the real SmolLM2-135M-Instruct (CPU): a short consecutive stream of ZsRE edits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model, remove_hook_layers
from smedit_plugin.records import load_zsre
from smedit_plugin.requests import to_requests
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.slow


def test_consecutive_zsre_edits_land_and_detach_exactly(smollm2, tmp_path: Path) -> None:
    """Uses the shared session model: the hooks come off at the end and its weights are never written."""
    model, tok = smollm2
    records = load_zsre(DATA / "zsre" / "zsre_eval.json", limit=6)
    reference = predict_locality_reference(model, tok, records)
    before = evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                              progress=False)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**probe).logits
    hp = COMEBAHKHyperParams.from_hparams(ROOT / "hparams" / "COMEBA-HK" / "smollm2-135m.yaml").replace(
        v_num_grad_steps=8, mom2_n_samples=200, mom2_max_len=128, stats_dir=str(tmp_path),
        context_template_length_params=[[10, 2]])
    requests = to_requests(records)
    try:
        for start in (0, 3):
            apply_comeba_hk_to_model(model, tok, requests[start:start + 3], hp)
        after = evaluate_records(model, tok, records, dataset="zsre", locality="agreement", reference=reference,
                                 progress=False)
        # 8 z steps and a 200-sample covariance keep this CI-sized; measured rise here: 0.117 -> 0.283
        assert after["efficacy"] > before["efficacy"] + 0.1, (before["efficacy"], after["efficacy"])
        assert after["specificity"] >= 0.8
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in originals.items())
    finally:
        remove_hook_layers(model)
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, base_logits)
