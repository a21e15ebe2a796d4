"""Model loading (packaged CPU models by key, anything else through ``from_pretrained``) and the
architectures the papers edit.

``smollm2-135m`` and ``gemma-3-270m`` come from the GGUF packages, converted once by
:mod:`smedit_plugin.gguf_convert`. Tiny random stand-ins for tests live in :mod:`smedit_plugin.testing`,
edit-module lookup in :mod:`smedit_plugin.edit_modules` (the method code needs no model loader).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

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


def load_model_for(hparams: Any, name: Optional[str] = None) -> tuple[nn.Module, Any]:
    """Load ``name`` (default ``hparams.model_name``) as the hparams say: ``model_dtype`` (null = float16
    if ``fp16`` else float32, as the field's help promises), ``device`` and ``model_parallel``."""
    dtype = getattr(hparams, "model_dtype", None) or ("float16" if getattr(hparams, "fp16", False) else "float32")
    return load_model_and_tokenizer(hparams.model_name if name is None else name, dtype=dtype,
                                    device=getattr(hparams, "device", None),
                                    model_parallel=bool(getattr(hparams, "model_parallel", False)))


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
