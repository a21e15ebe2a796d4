"""The transformers API differences across the releases ``setup.cfg`` admits (4.46 to the newest 5.x).

Each helper asks the installed library (a signature, a version) rather than assuming one era, so the
same call works on 4.57 and on 5.2x, and no deprecated name is used where its successor exists.
"""
from __future__ import annotations

import inspect
from typing import Any, Union

import torch
from torch import nn

from .devices import resolve_dtype


def transformers_version() -> Any:
    """The installed transformers version as a ``packaging`` Version."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def dtype_kwargs(dtype: Union[str, torch.dtype, None]) -> dict[str, Any]:
    """``from_pretrained`` keyword for a dtype: ``dtype=`` from transformers 4.56 on, ``torch_dtype=`` before.

    ``None`` asks for the checkpoint's own dtype (``"auto"``), which is what transformers 5 does
    by default and 4.x does not, so both versions load the same thing.
    """
    from packaging.version import Version

    value: Union[str, torch.dtype] = "auto" if dtype is None else dtype
    if isinstance(value, str) and value != "auto":
        value = resolve_dtype(value)
    key = "dtype" if transformers_version() >= Version("4.56") else "torch_dtype"
    return {key: value}


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` in newer 5.x releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(model: nn.Module, output: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned, read under the name that release uses."""
    return getattr(output, cache_keyword(model))
