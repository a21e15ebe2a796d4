"""Edit modules by name, and the (in, out) convention of their weights, for every method's code."""
from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn


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
    refuse_offloaded(model, [name for name, _ in resolved], "edit_modules")
    return resolved


def _accelerate_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def refuse_offloaded(model: nn.Module, names: Iterable[str], field: str) -> None:
    """Raise before any change if an edited module's weights are offloaded (``device_map`` with cpu/disk offload).

    Accelerate keeps such weights on the meta device and swaps a copy in for each forward, so an
    in-place edit would be written into a throw-away copy (or fail on meta) and be lost silently.
    """
    offloaded = []
    for name in names:
        module = model.get_submodule(name)
        parts = name.split(".")
        owners = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
        weight = getattr(module, "weight", None)
        on_meta = isinstance(weight, torch.Tensor) and weight.device == torch.device("meta")
        if on_meta or any(getattr(hook, "offload", False) for owner in owners for hook in _accelerate_hooks(owner)):
            offloaded.append(name)
    if offloaded:
        raise ValueError(
            f"hparams field {field!r}: {offloaded} are offloaded (device_map put their weights on cpu/disk, they live "
            "on the meta device between forwards), so an edit would be lost; load the model so these modules sit on a "
            "GPU or the CPU (e.g. device_map='auto' with a larger max_memory, or no offload) or edit other layers")
