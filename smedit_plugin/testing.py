"""Tiny random models for tests and examples: the real depth of the architectures the papers edit, width 64.

Edit-module lists such as ``model.layers.32.mlp.gate_proj`` resolve on them, and a forward pass
takes milliseconds. Nothing in the runtime path imports this module.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .models import load_tokenizer


TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_HEADS = 4


def _transformers_class(name: str) -> type:
    """A class exported by transformers, or an error saying the installed version is too old for it."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no {name}; upgrade transformers "
                           "(Gemma 3 needs 4.50 or later)")
    return cls


class TinyArch(NamedTuple):
    """A tiny stand-in: transformers model and config class names, the real depth, extra config fields."""

    model_class: str
    config_class: str
    depth: int
    config: dict[str, Any]


TINY_ARCHS: dict[str, TinyArch] = {
    "gpt-j": TinyArch("GPTJForCausalLM", "GPTJConfig", 28, {}),
    "llama3": TinyArch("LlamaForCausalLM", "LlamaConfig", 32, {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    "gemma-2": TinyArch("Gemma2ForCausalLM", "Gemma2Config", 42,
                        {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64}),
    "smollm2": TinyArch("LlamaForCausalLM", "LlamaConfig", 30, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gemma-3": TinyArch("Gemma3ForCausalLM", "Gemma3TextConfig", 18,
                        {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 64}),
}


def _tiny_config(arch: str, n_layers: int, tokenizer: Any) -> Any:
    """A real transformers config of ``arch`` at tiny width, vocabulary sized to ``tokenizer``."""
    spec = TINY_ARCHS[arch]
    shared = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt-j":
        sizes = {"n_positions": 512, "n_embd": TINY_HIDDEN, "n_layer": n_layers, "n_head": TINY_HEADS,
                 "rotary_dim": 8, "n_inner": TINY_INTERMEDIATE, "tie_word_embeddings": False}
    else:
        sizes = {"hidden_size": TINY_HIDDEN, "intermediate_size": TINY_INTERMEDIATE, "num_hidden_layers": n_layers,
                 "num_attention_heads": TINY_HEADS, "max_position_embeddings": 512}
    return _transformers_class(spec.config_class)(**shared, **sizes, **spec.config)


def tiny_model(arch: str, *, seed: int = 0, n_layers: Optional[int] = None) -> tuple[nn.Module, Any]:
    """A randomly initialised model of ``arch`` (real depth, width 64) with the SmolLM2 tokenizer.

    Deterministic for a given ``seed`` without touching the global RNG. The SmolLM2 tokenizer is
    real and works offline; the vocabulary is sized to it. ``n_layers`` overrides the depth.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {sorted(TINY_ARCHS)}")
    depth = TINY_ARCHS[arch].depth if n_layers is None else n_layers
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    tokenizer = load_tokenizer("smollm2-135m")
    config = _tiny_config(arch, depth, tokenizer)
    config._attn_implementation = "eager"
    config._name_or_path = f"tiny-{arch}"  # tools that key caches by model name (EasyEdit's layer_stats) need one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _transformers_class(TINY_ARCHS[arch].model_class)(config)
    model.eval()
    return model, tokenizer


