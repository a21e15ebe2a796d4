"""Thin adapters between the method and transformers models: lookup, block outputs, early stop, logits.

Everything architecture-specific that the MEMIT machinery needs lives here, so the math files
only see tensors: where a module is, how a decoder block returns its hidden state (a tensor in
current Llama code, a tuple in GPT-J), how to stop a forward early, and how to get logits from a
block output at a few positions (final norm, unembedding, Gemma's logit soft-cap).
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..edit_modules import weight_shape_in_out


def get_module(model: nn.Module, name: str, field: str) -> nn.Module:
    """``model``'s submodule ``name``; a missing name raises naming the hparams ``field`` and close names."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.6)
    hint = f"; closest names: {', '.join(close)}" if close else ""
    raise ValueError(f"hparams field {field!r}: module {name!r} does not exist in {type(model).__name__}{hint}")


def num_layers(model: nn.Module) -> int:
    """Decoder depth from the config (``num_hidden_layers`` or GPT-style ``n_layer``)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of layers from {type(model).__name__}'s config")


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden state a decoder block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced, keeping the container type the model expects."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class StopForward(Exception):
    """Raised by a hook once everything needed has been captured, to skip the remaining layers."""


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort a forward right after ``module`` ran; the ``with`` body swallows only that abort."""
    def hook(_mod: nn.Module, _args: Any, _out: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; the caller's flags come back afterwards.

    Keys and target values must not see dropout, and frozen weights keep backward from saving
    activations for weight gradients nobody needs.
    """
    training = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in grads.items():
            p.requires_grad_(flag)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The rewrite module's weight as ``[d_out, d_in]`` (a view; GPT-2 ``Conv1D`` stores it transposed)."""
    weight_shape_in_out(module)
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def final_logit_softcap(model: nn.Module) -> Optional[float]:
    """Gemma-2's ``final_logit_softcapping`` (None for models without one)."""
    config = getattr(model, "config", None)
    value = getattr(config, "final_logit_softcapping", None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), "final_logit_softcapping", None)
    return float(value) if value else None


def logits_from_hidden(hidden: torch.Tensor, ln_f: nn.Module, lm_head: nn.Module,
                       softcap: Optional[float]) -> torch.Tensor:
    """Float32 logits of a few block-output rows: final norm, unembedding (+ bias), soft-cap.

    Only the rows the loss needs go through the unembedding; HF would compute every position. The
    modules are called (not their ``.weight`` read), so a ``device_map``'s hooks move the rows to them.
    """
    normed = ln_f(hidden)
    logits = lm_head(normed.to(lm_head.weight.dtype)).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


#: Attribute names of a norm applied to the MLP output before the residual add (Gemma-2/3, OLMo-2).
POST_MLP_NORMS = ("post_feedforward_layernorm",)


def post_mlp_norm(block: nn.Module) -> Optional[nn.Module]:
    """The block's post-MLP norm, or None when the MLP output goes straight into the residual."""
    for name in POST_MLP_NORMS:
        norm = getattr(block, name, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def norm_gain(norm: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """Per-channel gain ``g`` of an RMS norm, read as ``norm(ones)`` (``rms(ones) = 1``), float64."""
    ones = torch.ones(1, width, dtype=like.dtype, device=like.device)
    return norm(ones)[0].double()


def _attributes(obj: Any) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, list) else value for key, value in vars(obj).items()}


@contextlib.contextmanager
def cache_checkpoint(cache: Any) -> Iterator[None]:
    """Put a KV cache back exactly as it was on exit: appended tokens (and their autograd graph) are dropped.

    Works on the attributes of the cache and of its per-layer objects, so it covers both the
    list-of-tensors caches of older transformers and the per-layer caches of 4.5x.
    """
    saved = cache_state(cache)
    try:
        yield
    finally:
        restore_cache_state(saved)


CacheState = list[tuple[Any, dict[str, Any]]]


def cache_state(cache: Any) -> CacheState:
    """The attributes of a KV cache and of its per-layer objects, as they are now (tensors shared, not copied)."""
    owners = [cache] + [layer for layer in getattr(cache, "layers", []) if hasattr(layer, "__dict__")]
    return [(owner, _attributes(owner)) for owner in owners]


def restore_cache_state(saved: CacheState) -> None:
    """Put a cache back to a :func:`cache_state`; lists are copied again, so ``saved`` can be restored many times."""
    for owner, attributes in saved:
        owner.__dict__.clear()
        owner.__dict__.update({key: list(value) if isinstance(value, list) else value
                               for key, value in attributes.items()})


def select_cache_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only ``rows`` of the batch in a KV cache, each layer indexed on its own device (``device_map``).

    ``cache.batch_select_indices`` would index every layer with one tensor, which fails once the
    layers live on several GPUs.
    """
    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    if layers:
        for layer in layers:
            layer.batch_select_indices(rows.to(layer.keys.device))
        return
    for store in (getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)):  # transformers 4.x
        for i, tensor in enumerate(store or []):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                store[i] = tensor[rows.to(tensor.device), ...]


def sliding_window(model: nn.Module) -> Optional[int]:
    """The attention window of sliding-window layers (Gemma, Mistral), if the model has one."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "sliding_window", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` / ``model.transformer``).

    ``get_decoder()`` is right for Llama/Gemma-3 but returns the whole model for GPT-J, and
    ``base_model`` is the model itself for Gemma-3's causal LM, so take the first that differs.
    """
    get_decoder = getattr(model, "get_decoder", None)
    for candidate in (get_decoder() if callable(get_decoder) else None, getattr(model, "base_model", None)):
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    return model
