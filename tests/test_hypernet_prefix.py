"""Reusing the frozen prefix (layers below the lowest edit module) changes nothing but the work done.

Each test runs the same computation with ``reuse_frozen_prefix`` on and off, on tiny random models
of two architectures, and compares keys, value gradients, losses, trained hypernetworks and edited
weights; one test counts the lower layers' forwards to show they are actually skipped.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from smedit_plugin.records import EditRecord, load_records
from smedit_plugin.hypernet.editor import edit_batch
from smedit_plugin.hypernet.cache import cache_keys_and_value_grads
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.hypernet.losses import answer_cross_entropy
from smedit_plugin.hypernet.prefix import FrozenPrefix, decoder_layers, forward_context
from smedit_plugin.hypernet.trainer import MetaTrainer
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.smedit.hparams import SMEditHyperParams
from smedit_plugin.text import build_batch

LLAMA_MODULES = ["model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"]
GPTJ_MODULES = ["transformer.h.2.mlp.fc_in", "transformer.h.3.mlp.fc_in"]
SMALL = dict(rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3, n_edits=4, micro_batch_size=2, chunk_size=3, max_steps=2)


@pytest.fixture(scope="module")
def llama(tiny):
    return tiny("smollm2", n_layers=5)


@pytest.fixture(scope="module")
def gptj(tiny):
    return tiny("gpt-j", n_layers=5)


@pytest.fixture(scope="module")
def records(zsre_train_path) -> list[EditRecord]:
    return load_records(zsre_train_path, dataset="zsre", limit=24)


def test_decoder_layers_finds_the_lowest_edited_block(llama, gptj) -> None:
    blocks, first = decoder_layers(llama[0], LLAMA_MODULES)
    assert blocks is llama[0].model.layers and first == 2
    blocks, first = decoder_layers(gptj[0], GPTJ_MODULES)
    assert blocks is gptj[0].transformer.h and first == 2
    assert decoder_layers(llama[0], ["lm_head"]) is None
    assert not FrozenPrefix(llama[0], ["model.layers.0.mlp.up_proj", "model.layers.3.mlp.up_proj"]).enabled


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_second_forward_skips_the_prefix_and_gives_the_same_loss(arch, request, records) -> None:
    model, tok = request.getfixturevalue(arch)
    modules = LLAMA_MODULES if arch == "llama" else GPTJ_MODULES
    blocks, first = decoder_layers(model, modules)
    calls = []
    handles = [blocks[i].mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(len(blocks))]
    prefix = FrozenPrefix(model, modules)
    batch = build_batch(tok, [r.prompt for r in records[:3]], [r.target_new for r in records[:3]])
    try:
        plain = answer_cross_entropy(model, batch)
        with forward_context(prefix, batch):
            first_pass = answer_cross_entropy(model, batch)
        calls.clear()
        with forward_context(prefix, batch):
            reused = answer_cross_entropy(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(first, len(blocks)))  # the blocks below the first edited one did not compute
    assert torch.equal(plain, first_pass) and torch.equal(plain, reused)
    # the model is left as it was: a plain forward runs every block again
    calls.clear()
    handles = [blocks[i].mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(len(blocks))]
    try:
        answer_cross_entropy(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(len(blocks)))


def test_a_changed_micro_batch_is_not_fed_stale_states(llama, records) -> None:
    model, tok = llama
    prefix = FrozenPrefix(model, LLAMA_MODULES)
    a = build_batch(tok, [records[0].prompt], [records[0].target_new])
    b = build_batch(tok, [records[1].prompt], [records[1].target_new])
    with forward_context(prefix, a):
        answer_cross_entropy(model, a)
    with forward_context(prefix, b):  # another tensor: recorded, not replayed
        loss_b = answer_cross_entropy(model, b)
    assert torch.equal(loss_b, answer_cross_entropy(model, b))


def test_keys_and_value_grads_equal_the_plain_trace(llama, records) -> None:
    model, tok = llama
    pairs = [(n, model.get_submodule(n)) for n in LLAMA_MODULES]
    mbs = [build_batch(tok, [r.prompt for r in records[i:i + 2]], [r.target_new for r in records[i:i + 2]])
           for i in (0, 2)]
    plain = cache_keys_and_value_grads(model, pairs, mbs)
    prefix = FrozenPrefix(model, LLAMA_MODULES)
    cache_keys_and_value_grads(model, pairs, mbs, prefix=prefix)
    reused = cache_keys_and_value_grads(model, pairs, mbs, prefix=prefix)
    for name in LLAMA_MODULES:
        assert torch.equal(plain[name].keys, reused[name].keys)
        assert torch.equal(plain[name].value_grads, reused[name].value_grads)


def _trained(model: nn.Module, tok, hp, records) -> tuple[MetaTrainer, list[float]]:
    torch.manual_seed(0)
    trainer = MetaTrainer(model, tok, hp)
    state = trainer.train(records, progress=False)
    return trainer, [entry["loss"] for entry in state.history]


@pytest.mark.parametrize("hp_class,extra", [
    (SMEditHyperParams, {}),
    (MALMEN2HyperParams, {}),  # KL locality: reference logits and KL passes go through the prefix too
    (RLEdit2HyperParams, {"num_seq": 3, "n_edits": 2, "back_depth": 2}),  # sequential with backtracking
])
def test_training_with_the_reused_prefix_equals_the_plain_path(llama, records, hp_class, extra) -> None:
    model, tok = llama
    hp = hp_class(model_name="tiny-smollm2", edit_modules=LLAMA_MODULES, **{**SMALL, **extra})
    on, losses_on = _trained(copy.deepcopy(model), tok, hp, records)
    off, losses_off = _trained(copy.deepcopy(model), tok, hp.replace(reuse_frozen_prefix=False), records)
    assert on.state.optimizer_steps == off.state.optimizer_steps > 0
    assert losses_on == pytest.approx(losses_off, rel=1e-5, abs=1e-7)
    for (name, a), b in zip(on.editor.state_dict().items(), off.editor.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_an_edit_with_the_reused_prefix_equals_the_plain_path(llama, records) -> None:
    model, tok = llama
    hp = SMEditHyperParams(model_name="tiny-smollm2", edit_modules=LLAMA_MODULES, **SMALL)
    torch.manual_seed(0)
    editor = HypernetEditor(model, hp)
    prompts, targets = [r.prompt for r in records[:4]], [r.target_new for r in records[:4]]
    results = []
    for reuse in (True, False):
        edited = copy.deepcopy(model)
        editor.hparams = hp.replace(reuse_frozen_prefix=reuse)
        editor.bind(edited)
        edit_batch(edited, tok, editor, prompts, targets)
        results.append({n: edited.get_submodule(n).weight.detach().clone() for n in LLAMA_MODULES})
    for name in LLAMA_MODULES:
        assert not torch.equal(results[0][name], model.get_submodule(name).weight)
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-6, atol=1e-8), name
