"""Device and dtype resolution that never touches CUDA unless CUDA was asked for and exists."""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

DeviceSpec = Optional[Union[int, str, torch.device]]


def resolve_device(spec: DeviceSpec) -> torch.device:
    """Map EasyEdit-style device values to a usable ``torch.device``.

    ``None`` means CUDA when present, else CPU. An int, a digit string or ``"cuda:N"`` asks for a
    GPU; without CUDA it falls back to CPU with a warning, so the same YAML runs on laptops and CI.
    """
    if isinstance(spec, torch.device):
        if spec.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(f"device {spec} requested but CUDA is not available; using CPU", stacklevel=2)
            return torch.device("cpu")
        return _check_cuda_index(spec)
    if spec is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(spec, bool):
        raise ValueError(f"device must be an int, 'cpu', 'cuda', 'cuda:N' or null, got {spec!r}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        return resolve_device(torch.device("cuda", int(spec)))
    if not isinstance(spec, str):
        raise ValueError(f"device must be an int, 'cpu', 'cuda', 'cuda:N' or null, got {spec!r}")
    try:
        dev = torch.device(spec.strip())
    except RuntimeError as exc:
        raise ValueError(f"invalid device {spec!r}: use an int, 'cpu', 'cuda', 'cuda:N' or null") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {spec!r} requested but CUDA is not available; using CPU", stacklevel=2)
        return torch.device("cpu")
    return _check_cuda_index(dev)


def _check_cuda_index(dev: torch.device) -> torch.device:
    """A GPU index that exists, or an error saying which ones do (CUDA's own error names no setting)."""
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise ValueError(f"device {dev} requested but this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1}); set 'device' to one of them, or to null for the "
                             "default GPU (model_parallel: true spreads a model over all of them)")
    return dev


def model_input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the input-embedding device (works with accelerate ``device_map``)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or None for the checkpoint's default)."""
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None
