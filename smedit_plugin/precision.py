"""Edited modules in float32 for the length of an edit, rounded back to the model's dtype once at the end.

A bf16 weight has 8 significant bits: a shift of 1e-3 of the weight's size, added straight into it,
mostly vanishes, and every further BP step rounds again, while the hypernetwork's meta-gradient and
norm penalty see the unrounded shift. Inside :func:`float32_edit_weights` the edited modules compute
in float32 (inputs cast up, outputs cast back to the dtype the model expects), so every step's
caching, gradient and update see the exact sum ``W + shifts``; on exit each weight is rounded once
and the relative rounding error of the total update is reported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

REDUCED = (torch.bfloat16, torch.float16)


def wants_float32(modules: dict[str, nn.Module], option: Optional[bool]) -> bool:
    """The ``fp32_edit_weights`` option resolved: null = on when any edited weight is bf16/fp16."""
    if option is not None:
        return option
    return any(module.weight.dtype in REDUCED for module in modules.values())


@dataclasses.dataclass
class RoundingReport:
    """Per module: ``||round(W_end) - W_end|| / ||W_end - W_start||`` (0 when nothing was rounded)."""

    relative_error: dict[str, float] = dataclasses.field(default_factory=dict)


def _cast_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def _cast_output(dtype: torch.dtype):
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)
    return hook


@contextlib.contextmanager
def float32_edit_weights(modules: dict[str, nn.Module], enabled: bool = True) -> Iterator[RoundingReport]:
    """Hold the reduced-precision ``modules`` (weight and bias) in float32 inside the block.

    The parameter objects stay the same (snapshots and optimiser references remain valid); only
    their data changes dtype. On exit, even after an error, the data goes back to the original
    dtype. Memory: one float32 copy of each edited weight while the block runs.
    """
    report = RoundingReport()
    chosen = {name: m for name, m in modules.items() if enabled and m.weight.dtype in REDUCED}
    saved: dict[str, tuple[torch.dtype, torch.Tensor]] = {}
    handles = []
    try:
        for name, module in chosen.items():
            dtype = module.weight.dtype
            saved[name] = (dtype, module.weight.detach().clone())
            for param in (module.weight, getattr(module, "bias", None)):
                if isinstance(param, nn.Parameter):
                    param.data = param.data.float()
            handles.append(module.register_forward_pre_hook(_cast_input))
            handles.append(module.register_forward_hook(_cast_output(dtype)))
        yield report
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, module in chosen.items():
                dtype, start = saved[name]
                exact = module.weight.data
                for param in (module.weight, getattr(module, "bias", None)):
                    if isinstance(param, nn.Parameter):
                        param.data = param.data.to(dtype)
                update = (exact - start.float()).norm()
                error = (module.weight.float() - exact).norm()
                report.relative_error[name] = float(error / update) if float(update) > 0 else 0.0
        if report.relative_error:
            logger.debug("edited weights rounded back to %s once; relative rounding error of the update: %s",
                        next(iter(saved.values()))[0], {k: round(v, 4) for k, v in report.relative_error.items()})
