"""A tiny model spread by a device map over two fake GPUs (tests/spread_devices.py) edits and scores
without a device mismatch, and gives the numbers of the same model on one device."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model
from smedit_plugin.comeba_hk.modules import select_cache_rows
from smedit_plugin.general import score_choices
from smedit_plugin.hypernet.editor import edit_batch
from smedit_plugin.tfcompat import transformers_version

# The harness's two "GPUs" are meta:0 / meta:1 wrappers; transformers 4.x's rotary embedding opens
# torch.autocast(device_type=<the tensor's device type>), which torch refuses for "meta" ("unsupported
# scalarType"). That is the harness, not the code under test, so these run on transformers 5 (CI leg 1).
pytestmark = [pytest.mark.skipif(transformers_version().major < 5,
                                 reason="fake-GPU harness needs transformers >= 5 (4.x rotary autocast rejects meta)"),
              pytest.mark.usefixtures("direct_call_semantics")]
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.testing import tiny_model
from smedit_plugin.tfcompat import returned_cache
from spread_devices import GPUS, OnDevice, fake_gpus, spread
from test_comeba_hk_editing import LLAMA, REQUESTS

#: The upper half of a 4-layer model and the head on the second GPU, the rest on the first.
SECOND_HALF = ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
EDIT_MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.elem.detach().clone() if isinstance(tensor, OnDevice) else tensor.detach().clone()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _host(p) for name, p in model.named_parameters()}


def test_the_harness_raises_on_a_cross_device_op_and_on_the_old_cache_row_selection() -> None:
    """So the tests below could fail: an index built on the input GPU used on the second GPU's cache raises."""
    model, tok = tiny_model("llama3", n_layers=4)
    with fake_gpus():
        spread(model, SECOND_HALF)
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(3, device=GPUS[0]) + torch.ones(3, device=GPUS[1])
        batch = tok(["hello world", "a b c"], return_tensors="pt", padding=True)
        rows = torch.tensor([1], device=GPUS[0])
        with pytest.raises(RuntimeError, match="same device"):
            returned_cache(model.model, model.model(input_ids=batch.input_ids.to(GPUS[0]), use_cache=True)
                           ).batch_select_indices(rows)
        cache = returned_cache(model.model, model.model(input_ids=batch.input_ids.to(GPUS[0]), use_cache=True))
        select_cache_rows(cache, rows)
        assert {layer.keys.shape[0] for layer in cache.layers} == {1}
        assert {layer.keys.device for layer in cache.layers} == set(GPUS)


@pytest.mark.parametrize("alg,prefix_cache", [("COMEBA-HK", True), ("COMEBA-HK", False), ("MEMIT-C", True)])
def test_comeba_hk_step_on_a_spread_model_equals_one_device(tmp_path, alg: str, prefix_cache: bool) -> None:
    """Edited layers on both GPUs, the z block on the second: state and weights match the unspread model."""
    hp = COMEBAHKHyperParams(model_name="tiny-llama", alg_name=alg, layers=[1, 2], v_loss_layer=3,
                             v_num_grad_steps=4, clamp_norm_factor=4.0, mom2_update_weight=10.0, mom2_n_samples=20,
                             mom2_max_len=32, stats_dir=str(tmp_path), context_template_length_params=[[4, 2]],
                             z_prefix_cache=prefix_cache, alpha_z=2.0, **LLAMA)
    if alg == "COMEBA-HK":
        hp.alpha_z = -math.inf  # past validation (the loader refuses it): every token gets the shift
    single, tok = tiny_model("llama3", n_layers=4)
    spread_model = copy.deepcopy(single)
    before = _params(single)
    apply_comeba_hk_to_model(single, tok, REQUESTS, hp)
    with fake_gpus():
        spread(spread_model, SECOND_HALF)
        apply_comeba_hk_to_model(spread_model, tok, REQUESTS, hp)
        on_gpus = {p.device for p in spread_model.parameters()}
        edited = _params(spread_model)
    assert on_gpus == set(GPUS)
    expected = _params(single)
    assert edited.keys() == expected.keys()
    changed = [name for name in expected if not torch.equal(expected[name], before.get(name, expected[name] + 1))]
    assert changed  # the step did change the state (or, for MEMIT-C, the weights)
    for name in expected:
        torch.testing.assert_close(edited[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hypernetwork_edit_on_a_spread_model_equals_one_device(zsre_eval_path) -> None:
    from smedit_plugin.records import load_records

    records = load_records(zsre_eval_path, dataset="zsre", limit=3)
    hp = MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4, n_blocks=2, lr=1e-2,
                            micro_batch_size=2, chunk_size=3)
    single, tok = tiny_model("llama3", n_layers=4)
    spread_model = copy.deepcopy(single)
    editor = HypernetEditor(single, hp, device=torch.device("cpu"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in editor.nets.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    before = _params(single)
    edit_batch(single, tok, editor, prompts, targets)
    editor.bind(spread_model)
    with fake_gpus():
        spread(spread_model, SECOND_HALF)
        edit_batch(spread_model, tok, editor, prompts, targets)
        edited = _params(spread_model)
    for name in EDIT_MODULES:
        weight = f"{name}.weight"
        assert not torch.equal(_params(single)[weight], before[weight])
        torch.testing.assert_close(edited[weight], _params(single)[weight], rtol=1e-5, atol=1e-6, msg=weight)


def test_general_check_scores_on_a_spread_model_equal_one_device() -> None:
    single, tok = tiny_model("llama3", n_layers=4)
    spread_model = copy.deepcopy(single)
    prompts = ["Review: a joy to watch.\nSentiment:", "Question: Is the sky green?\nAnswer:"]
    choices = [("negative", "positive"), ("No", "Yes", "Only at night")]
    expected = score_choices(single, tok, prompts, choices, batch_size=2)
    with fake_gpus():
        spread(spread_model, SECOND_HALF)
        scores = score_choices(spread_model, tok, prompts, choices, batch_size=2)
    for row, want in zip(scores, expected):
        assert row == pytest.approx(want, abs=1e-5)


def _offload_block_2(model: nn.Module) -> None:
    """Accelerate's cpu offload of one block: its weights on meta between forwards, as with device_map offload."""
    from accelerate import cpu_offload

    cpu_offload(model.model.layers[2], execution_device=torch.device("cpu"))


def _logits(model: nn.Module, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok("Paris is the capital of France", return_tensors="pt")).logits


@pytest.mark.parametrize("alg", ["COMEBA-HK", "MEMIT-C"])
def test_comeba_hk_refuses_offloaded_rewrite_modules_before_any_change(tmp_path, alg: str) -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    _offload_block_2(model)
    before, params = _logits(model, tok), _params(model)
    hp = COMEBAHKHyperParams(model_name="tiny-llama", alg_name=alg, layers=[1, 2], v_loss_layer=3,
                             mom2_n_samples=20, mom2_max_len=32, stats_dir=str(tmp_path), **LLAMA)
    with pytest.raises(ValueError, match=r"rewrite_module_tmp.*model\.layers\.2\.mlp\.down_proj.*offloaded"):
        apply_comeba_hk_to_model(model, tok, REQUESTS, hp)
    assert torch.equal(_logits(model, tok), before)
    assert all(torch.equal(p, params[n]) for n, p in _params(model).items() if not p.is_meta)
    assert not hasattr(model, "comeba_hk_state")


def test_hypernetwork_refuses_offloaded_edit_modules_before_any_change() -> None:
    model, tok = tiny_model("llama3", n_layers=4)
    hp = MALMEN2HyperParams(model_name="tiny-llama", edit_modules=EDIT_MODULES, rank=4, n_blocks=2)
    editor = HypernetEditor(model, hp, device=torch.device("cpu"))
    _offload_block_2(model)
    before = _logits(model, tok)
    with pytest.raises(ValueError, match=r"edit_modules.*model\.layers\.2\.mlp\.up_proj.*offloaded"):
        editor.bind(model)
        edit_batch(model, tok, editor, ["The capital of France is"], ["Rome"])
    assert torch.equal(_logits(model, tok), before)
