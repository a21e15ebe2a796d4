"""Model loading (packaged CPU models by key, anything else through ``from_pretrained``), tiny models, module lookup.

``smollm2-135m`` and ``gemma-3-270m`` come from the GGUF packages, converted once by
:mod:`smedit_plugin.gguf_convert`. Tiny models keep the real depth of the architectures the papers
edit (so edit-module lists such as ``model.layers.32.mlp.gate_proj`` resolve) at a width that runs
in milliseconds.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .devices import DeviceSpec, resolve_device
from .gguf_convert import PRETRAINED, ensure_converted
from .tfcompat import dtype_kwargs


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_tokenizer(name: str) -> Any:
    """Tokenizer of a packaged model name or a Hugging Face path/id, with a pad token set."""
    from transformers import AutoTokenizer

    source = ensure_converted(name) if name in PRETRAINED else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name: str,
    *,
    dtype: Optional[str] = None,
    device: DeviceSpec = None,
    model_parallel: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is ``smollm2-135m`` / ``gemma-3-270m`` (converted once from the installed GGUF
    packages, then read from the cache) or anything ``from_pretrained`` accepts. ``dtype`` is
    ``float32``/``bfloat16``/``float16`` or None for the checkpoint's dtype (packaged models are
    cached in float32). ``model_parallel`` spreads the model with ``device_map="auto"`` instead of
    moving it to ``device``.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    kwargs = dtype_kwargs(dtype)
    target_device = None if model_parallel else resolve_device(device)
    if model_parallel:
        kwargs["device_map"] = "auto"
    source = ensure_converted(name) if name in PRETRAINED else name
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if target_device is not None:
        model.to(target_device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Architectures the papers edit, and tiny random stand-ins with their real depths
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArchitectureInfo:
    """Facts about a model family the hparams files target.

    ``modules`` maps a role (``up``, ``gate``, ``down`` for gated MLPs; ``fc_in``, ``fc_out``
    for GPT-J; ``layer``, ``final_norm``, ``lm_head``) to a module-name template with ``{i}`` for
    the layer index. ``hidden_size``/``intermediate_size`` are the real widths, for shape checks.
    """

    key: str
    hub_id: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    modules: dict[str, str]
    tiny_arch: str

    def module_name(self, role: str, layer: Optional[int] = None) -> str:
        """One module name, e.g. ``module_name("gate", 12)`` -> ``model.layers.12.mlp.gate_proj``."""
        if role not in self.modules:
            raise ValueError(f"{self.key} has no module role {role!r}; use one of {sorted(self.modules)}")
        template = self.modules[role]
        if "{i}" in template:
            if layer is None or not 0 <= layer < self.n_layers:
                raise ValueError(f"{self.key}: role {role!r} needs a layer index in [0, {self.n_layers - 1}], got {layer!r}")
            return template.format(i=layer)
        return template


_GATED_MLP = {
    "layer": "model.layers.{i}",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
}

ARCHITECTURES: dict[str, ArchitectureInfo] = {
    info.key: info
    for info in (
        ArchitectureInfo("gpt-j-6b", "EleutherAI/gpt-j-6b", 28, 4096, 16384, {
            "layer": "transformer.h.{i}",
            "fc_in": "transformer.h.{i}.mlp.fc_in",
            "fc_out": "transformer.h.{i}.mlp.fc_out",
            "final_norm": "transformer.ln_f",
            "lm_head": "lm_head",
        }, "gpt-j"),
        ArchitectureInfo("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", 32, 4096, 14336, dict(_GATED_MLP), "llama3"),
        ArchitectureInfo("gemma-2", "google/gemma-2-9b-it", 42, 3584, 14336, dict(_GATED_MLP), "gemma-2"),
        ArchitectureInfo("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 1536, dict(_GATED_MLP), "smollm2"),
        ArchitectureInfo("gemma-3-270m", "google/gemma-3-270m", 18, 640, 2048, dict(_GATED_MLP), "gemma-3"),
    )
}

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


# --------------------------------------------------------------------------------------------
# Edit-module lookup
# --------------------------------------------------------------------------------------------

def _conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def weight_shape_in_out(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an edit module: ``nn.Linear`` stores (out, in), GPT-2 ``Conv1D`` (in, out)."""
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        return int(d_in), int(d_out)
    if isinstance(module, _conv1d_class()):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise ValueError(f"{type(module).__name__} is not an nn.Linear or GPT-2 Conv1D module")


def resolve_edit_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Look up edit modules by name (a trailing ``.weight`` is accepted), in the given order.

    Raises ``ValueError`` naming a missing module (with the closest real names), a duplicate, or a
    module that is not ``nn.Linear``/``Conv1D``, before anything is touched.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"edit_modules must be a non-empty list of module names, got {names!r}")
    modules = dict(model.named_modules())
    linear_types = (nn.Linear, _conv1d_class())
    resolved: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for raw in names:
        if not isinstance(raw, str):
            raise ValueError(f"edit_modules entries must be strings, got {raw!r}")
        name = raw[: -len(".weight")] if raw.endswith(".weight") else raw
        if name in seen:
            raise ValueError(f"edit module {name!r} is listed twice in edit_modules")
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f"; closest names: {', '.join(close)}" if close else ""
            raise ValueError(f"edit module {name!r} does not exist in {type(model).__name__}{hint}")
        if not isinstance(module, linear_types):
            raise ValueError(
                f"edit module {name!r} is a {type(module).__name__}; only nn.Linear and Conv1D modules can be edited"
            )
        seen.add(name)
        resolved.append((name, module))
    return resolved
