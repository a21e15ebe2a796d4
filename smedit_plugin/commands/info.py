"""``smedit info``: versions, devices, EasyEdit era and registered methods."""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

from ..methods import METHODS
from .base import Runner


def _devices() -> str:
    import torch

    parts = ["cpu"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(f"cuda x{len(names)} ({', '.join(names)})")
    else:
        parts.append("cuda not available")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        parts.append("mps")
    return ", ".join(parts)


def _easyedit_status() -> str:
    """Whether EasyEdit imports here and, if it does, its era (A = PyPI wheel, C = current GitHub)."""
    if importlib.util.find_spec("easyeditor") is None:
        return "not installed"
    from .. import easyedit

    easyedit.install_transformers_shim()
    try:
        easyedit.import_easyeditor(tolerate_missing_vision=True)
    except ImportError as exc:
        return f"installed but fails to import: {exc}"
    return f"installed, era {easyedit.detect_era()}"


def info_lines() -> list[str]:
    """What ``smedit info`` prints, one ``label: value`` per line."""
    import torch
    import transformers

    from .._version import __version__
    from ..fileio import cache_dir
    from ..gguf_convert import PRETRAINED, converted_model_dir

    converted = [name for name in PRETRAINED if (converted_model_dir(name) / "config.json").is_file()]
    return [
        f"smedit-plugin: {__version__}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__}",
        f"transformers: {transformers.__version__}",
        f"devices: {_devices()}",
        f"easyeditor: {_easyedit_status()}",
        f"methods: {', '.join(METHODS)}",
        f"cache: {cache_dir()} (converted models: {', '.join(converted) or 'none'})",
    ]


def setup(parser: argparse.ArgumentParser) -> Runner:
    def run(args: argparse.Namespace) -> int:
        print("\n".join(info_lines()))
        return 0

    return run
