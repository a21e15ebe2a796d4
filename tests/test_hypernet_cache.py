"""Caching of keys / value gradients and answer-position losses on tiny random transformers models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTJConfig,
                          LlamaConfig)
from transformers.pytorch_utils import Conv1D

from smedit_plugin.answers import answer_labels, answer_logits
from smedit_plugin.hypernet import (HyperNet, ModuleCache, add_param_shift_, answer_cross_entropy,
                                    cache_keys_and_value_grads, kl_locality, predict_param_shift)

F64 = torch.float64
VOCAB = 128


def tiny_llama(dtype: torch.dtype = F64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(F64).eval()


def micro_batch(lengths: list[int], answer_lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; the last ``answer_length`` real positions of each row predict answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for row, (length, answer) in enumerate(zip(lengths, answer_lengths)):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = 0
        labels[row, length - answer:length] = torch.randint(1, VOCAB, (answer,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_trace(model: nn.Module, modules: list[tuple[str, nn.Module]], batch: dict[str, torch.Tensor]):
    """Keys and ∂CE/∂output by plain hooks, full logits and autograd (the definition, no shortcuts)."""
    inputs, outputs = {}, {}
    handles = []
    for name, module in modules:
        def hook(mod, args, output, name=name):
            inputs[name] = args[0].detach()
            outputs[name] = output
        handles.append(module.register_forward_hook(hook))
    model.get_input_embeddings().weight.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.get_input_embeddings().weight.requires_grad_(False)
    for handle in handles:
        handle.remove()
    mask = batch["labels"] != -100
    loss = F.cross_entropy(logits[mask].float(), batch["labels"][mask])
    grads = torch.autograd.grad(loss, [outputs[name] for name, _ in modules])
    return {name: (inputs[name][mask], grad[mask]) for (name, _), grad in zip(modules, grads)}


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_keys_and_value_grads_match_hooks_and_autograd() -> None:
    model = frozen(tiny_llama())
    layers = model.model.layers
    modules = [("model.layers.0.mlp.gate_proj", layers[0].mlp.gate_proj),
               ("model.layers.1.mlp.down_proj", layers[1].mlp.down_proj),
               ("model.layers.1.mlp.up_proj", layers[1].mlp.up_proj)]
    batches = [micro_batch([9, 6, 8], [3, 1, 2], seed=1), micro_batch([7, 7], [2, 4], seed=2)]
    caches = cache_keys_and_value_grads(model, modules, batches)
    assert list(caches) == [name for name, _ in modules]
    expected = [reference_trace(model, modules, batch) for batch in batches]
    for name, module in modules:
        cache = caches[name]
        assert cache.micro_batch_rows == [6, 6] and cache.n_rows == 12
        assert cache.keys.dtype == torch.float32 and cache.keys.device.type == "cpu"
        assert cache.keys.shape == (12, module.in_features) and cache.value_grads.shape == (12, module.out_features)
        for (keys, value_grads), (ref_keys, ref_grads) in zip(cache.micro_batches(), (e[name] for e in expected)):
            torch.testing.assert_close(keys, ref_keys.float(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(value_grads, ref_grads.float(), rtol=1e-5, atol=1e-8)
            assert value_grads.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # only output gradients were taken


def test_weight_grads_stay_untouched_when_weights_require_grad() -> None:
    model = frozen(tiny_llama())
    module = model.model.layers[1].mlp.down_proj
    module.weight.requires_grad_(True)
    batch = micro_batch([8, 5], [3, 2], seed=3)
    caches = cache_keys_and_value_grads(model, [("down", module)], [batch], storage_dtype=torch.bfloat16)
    assert module.weight.grad is None
    assert caches["down"].value_grads.dtype == torch.bfloat16
    ref_keys, ref_grads = reference_trace(model, [("down", module)], batch)["down"]
    torch.testing.assert_close(caches["down"].keys.float(), ref_keys.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(caches["down"].value_grads.float(), ref_grads.float(), rtol=1e-2, atol=1e-4)


def _gpt2_with_linear_c_proj(model: nn.Module) -> nn.Module:
    """Same network with every ``mlp.c_proj`` Conv1D replaced by an equal nn.Linear."""
    twin = copy.deepcopy(model)
    for block in twin.transformer.h:
        conv = block.mlp.c_proj
        linear = nn.Linear(conv.nx, conv.nf).to(F64)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        block.mlp.c_proj = linear
    return frozen(twin)


def test_conv1d_and_linear_modules_give_identical_caches_and_edits() -> None:
    model = frozen(tiny_gpt2())
    twin = _gpt2_with_linear_c_proj(model)
    assert isinstance(model.transformer.h[1].mlp.c_proj, Conv1D)
    batches = [micro_batch([8, 6], [2, 3], seed=4)]
    name = "transformer.h.1.mlp.c_proj"
    conv_cache = cache_keys_and_value_grads(model, [(name, model.transformer.h[1].mlp.c_proj)], batches)[name]
    linear_cache = cache_keys_and_value_grads(twin, [(name, twin.transformer.h[1].mlp.c_proj)], batches)[name]
    assert conv_cache.keys.shape == (5, 128) and conv_cache.value_grads.shape == (5, 32)
    torch.testing.assert_close(conv_cache.keys, linear_cache.keys)
    torch.testing.assert_close(conv_cache.value_grads, linear_cache.value_grads)

    torch.manual_seed(0)
    net = HyperNet(128, 32, rank=4, n_blocks=1, n_modules=1, lr_init=1.0).double()
    param_shift, _ = predict_param_shift(net, 0, conv_cache, chunk_size=2)
    before = answer_cross_entropy(model, batches[0])
    add_param_shift_(model.transformer.h[1].mlp.c_proj, param_shift)
    add_param_shift_(twin.transformer.h[1].mlp.c_proj, param_shift)
    after_conv, after_linear = answer_cross_entropy(model, batches[0]), answer_cross_entropy(twin, batches[0])
    torch.testing.assert_close(after_conv, after_linear)
    assert float(after_conv) < float(before)  # a gradient-step-like edit lowers the edit loss


def test_bf16_model_caches_fp32_rows_close_to_the_fp32_model() -> None:
    model32 = frozen(tiny_llama(torch.float32, seed=5))
    model16 = frozen(copy.deepcopy(model32).to(torch.bfloat16))
    batch = micro_batch([10, 7], [3, 3], seed=6)
    caches = [cache_keys_and_value_grads(m, [("up", m.model.layers[0].mlp.up_proj)], [batch])["up"]
              for m in (model32, model16)]
    assert caches[1].keys.dtype == torch.float32 and torch.isfinite(caches[1].value_grads).all()
    for field in ("keys", "value_grads"):
        a, b = getattr(caches[0], field).flatten(), getattr(caches[1], field).flatten()
        assert float(F.cosine_similarity(a, b, dim=0)) > 0.99, field


def _full_logits_at_answers(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["labels"] != -100]


@pytest.mark.parametrize("config", [
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB),
    GPTJConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64),
    Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, final_logit_softcapping=0.5),
    Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, final_logit_softcapping=0.5),
], ids=["llama", "gptj", "gemma2-softcap", "gemma3-softcap"])
def test_answer_logits_equal_full_logits_at_answer_positions(config) -> None:
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(F64).eval()
    batch = micro_batch([9, 5, 7], [2, 3, 1], seed=8)
    with torch.no_grad():
        logits = answer_logits(model, batch)
        expected = _full_logits_at_answers(model, batch)
    assert logits.shape == (6, VOCAB)
    torch.testing.assert_close(logits, expected)
    if getattr(config, "final_logit_softcapping", None):
        assert logits.abs().max() <= 0.5  # the model's own soft-capping was applied
    ce = answer_cross_entropy(model, batch)
    torch.testing.assert_close(ce, F.cross_entropy(expected.float(), answer_labels(batch)))


def test_kl_locality_is_batchmean_kl_of_reference_to_edit() -> None:
    gen = torch.Generator().manual_seed(9)
    ref, edit = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    p_ref = ref.softmax(-1)
    expected = (p_ref * (p_ref.log() - edit.log_softmax(-1))).sum() / 5
    torch.testing.assert_close(kl_locality(ref, edit), expected)
    assert float(kl_locality(ref, ref)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_locality(ref, edit)) != pytest.approx(float(kl_locality(edit, ref)), rel=1e-3)
    with pytest.raises(ValueError, match="ref_logits"):
        kl_locality(ref, edit[:4])


def test_module_cache_chunks_and_validation() -> None:
    cache = ModuleCache()
    with pytest.raises(ValueError, match="empty"):
        _ = cache.keys
    cache.append(torch.arange(6.0).reshape(3, 2), torch.ones(3, 4))
    cache.append(torch.arange(6.0, 10.0).reshape(2, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="width"):
        cache.append(torch.ones(1, 3), torch.ones(1, 4))
    chunks = list(cache.chunks(2, dtype=F64))
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1] and chunks[0][0].dtype == F64
    torch.testing.assert_close(torch.cat([c[0] for c in chunks]).float(), torch.arange(10.0).reshape(5, 2))
    assert [k.shape[0] for k, _ in cache.micro_batches()] == [3, 2]


def test_bad_micro_batches_and_modules_raise_before_any_forward() -> None:
    model = frozen(tiny_llama())
    module = model.model.layers[0].mlp.up_proj
    good = micro_batch([6], [2], seed=10)
    no_answer = dict(good, labels=torch.full_like(good["labels"], -100))
    with pytest.raises(ValueError, match="no answer positions"):
        cache_keys_and_value_grads(model, [("up", module)], [good, no_answer])
    with pytest.raises(ValueError, match="missing"):
        cache_keys_and_value_grads(model, [("up", module)], [{"input_ids": good["input_ids"]}])
    with pytest.raises(ValueError, match="not called"):
        cache_keys_and_value_grads(model, [("stray", nn.Linear(32, 64))], [good])
    with pytest.raises(ValueError, match="unique"):
        cache_keys_and_value_grads(model, [("up", module), ("up", module)], [good])
