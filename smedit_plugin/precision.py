"""Edited modules in float32 for the length of an edit, rounded back to the model's dtype once at the end.

A bf16 weight has 8 significant bits: a shift of 1e-3 of the weight's size, added straight into it,
mostly vanishes, and every further BP step rounds again, while the hypernetwork's meta-gradient and
norm penalty see the unrounded shift. Inside :func:`float32_edit_weights` the edited modules compute
in float32 (inputs cast up, outputs cast back to the dtype the model expects), so every step's
caching, gradient and update see the exact sum ``W + shifts``; on exit each weight is rounded once
and the relative rounding error of the total update is reported.

Rounding the edited bf16 weight once still loses every part of the update below half the weight's
spacing (2^-8 of its size): an update far smaller than the weights vanishes in part even here.
:func:`note_rounding` keeps each edit's report for :func:`last_rounding` and warns above
:data:`ROUNDING_WARN`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

REDUCED = (torch.bfloat16, torch.float16)
#: Relative rounding error of a module's update above which an edit logs a WARNING.
ROUNDING_WARN = 0.10
_LAST: "weakref.WeakKeyDictionary[nn.Module, RoundingReport]" = weakref.WeakKeyDictionary()


def wants_float32(modules: dict[str, nn.Module], option: Optional[bool]) -> bool:
    """The ``fp32_edit_weights`` option resolved: null = on when any edited weight is bf16/fp16."""
    if option is not None:
        return option
    return any(module.weight.dtype in REDUCED for module in modules.values())


@dataclasses.dataclass
class RoundingReport:
    """Per module: ``||round(W_end) - W_end|| / ||W_end - W_start||`` (0 when nothing was rounded).

    Empty when no weight was rounded (float32 modules, or ``fp32_edit_weights: false``, where every
    step's update is rounded as it is added and nothing measures it).
    """

    relative_error: dict[str, float] = dataclasses.field(default_factory=dict)
    dtype: Optional[torch.dtype] = None  # the dtype the weights were rounded to

    def above(self, threshold: float = ROUNDING_WARN) -> dict[str, float]:
        """The modules whose update lost more than ``threshold`` of its size to the rounding."""
        return {name: error for name, error in self.relative_error.items() if error > threshold}


def note_rounding(model: nn.Module, report: RoundingReport, method: str, fix: str) -> None:
    """Keep ``report`` as ``model``'s latest (:func:`last_rounding`) and log it: WARNING, with ``fix``, when a
    module's update lost more than :data:`ROUNDING_WARN` of its size, INFO otherwise."""
    _LAST[model] = report
    if not report.relative_error:
        return
    errors = {k: round(v, 4) for k, v in report.relative_error.items()}
    lost = report.above()
    if lost:
        logger.warning("%s: rounding the edited weights to %s lost %.0f %% of the update of %d of %d modules (worst %s: "
                       "%.0f %%); the update is small against the weights' %s spacing. %s. Relative rounding errors: %s",
                       method, report.dtype, 100 * max(lost.values()), len(lost), len(errors),
                       max(lost, key=lost.get), 100 * max(lost.values()), report.dtype, fix, errors)
    else:
        logger.info("%s: edit rounded back to %s once; relative rounding error of each module's update: %s",
                    method, report.dtype, errors)


def last_rounding(model: nn.Module) -> RoundingReport:
    """The rounding report of the latest edit of ``model`` by any method (empty before the first one)."""
    return _LAST.get(model, RoundingReport())


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
        norms = []  # (error, update) per module, read from the device once
        with torch.no_grad():
            for name, module in chosen.items():
                dtype, start = saved[name]
                exact = module.weight.data
                for param in (module.weight, getattr(module, "bias", None)):
                    if isinstance(param, nn.Parameter):
                        param.data = param.data.to(dtype)
                norms.append(torch.stack([(module.weight.float() - exact).norm(), (exact - start.float()).norm()]))
            if norms:
                home = norms[0].device
                values = torch.stack([pair.to(home) for pair in norms]).tolist()
                report.dtype = next(iter(saved.values()))[0]
                report.relative_error = {name: error / update if update > 0 else 0.0
                                         for name, (error, update) in zip(chosen, values)}
