"""In-memory caching of keys and value gradients at the answer tokens (meta-editing spec §1.3, §8.1, §8.12).

Keys are the edit modules' inputs and value gradients are ``∂CE/∂output`` at the positions whose logits
predict answer tokens. The references write both to disk with ``torch.save`` and get the gradients
through a full ``.backward()`` into the weights; here they stay in memory and come from
``torch.autograd.grad`` on the hooked outputs, which skips every weight-gradient GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..answers import AnswerRows, check_micro_batch
from ..text import answer_mask
from .losses import answer_cross_entropy
from .prefix import FrozenPrefix, forward_context

DeviceLike = Union[str, torch.device]


@dataclass
class ModuleCache:
    """Cached rows of one edit module: ``keys [N, d_in]`` and ``value_grads [N, d_out]``.

    Rows are appended per micro-batch, (example, position) row-major; ``micro_batch_rows`` remembers
    the split so callers can replay per-micro-batch normaliser updates exactly as the references do.
    """

    micro_batch_rows: list[int] = field(default_factory=list)
    _keys: list[Tensor] = field(default_factory=list, repr=False)
    _value_grads: list[Tensor] = field(default_factory=list, repr=False)

    def append(self, keys: Tensor, value_grads: Tensor) -> None:
        """Add one micro-batch of rows."""
        if keys.dim() != 2 or value_grads.dim() != 2 or keys.shape[0] != value_grads.shape[0]:
            raise ValueError(f"keys [N, d_in] and value_grads [N, d_out] need the same N, got "
                             f"{tuple(keys.shape)} and {tuple(value_grads.shape)}")
        if self._keys and (keys.shape[1] != self._keys[0].shape[1]
                           or value_grads.shape[1] != self._value_grads[0].shape[1]):
            raise ValueError("appended rows have a different width than the cached ones")
        self._keys.append(keys)
        self._value_grads.append(value_grads)
        self.micro_batch_rows.append(keys.shape[0])

    @property
    def n_rows(self) -> int:
        return sum(self.micro_batch_rows)

    def _consolidated(self, blocks: list[Tensor]) -> Tensor:
        if not blocks:
            raise ValueError("the module cache is empty; run cache_keys_and_value_grads first")
        if len(blocks) > 1:
            blocks[:] = [torch.cat(blocks)]
        return blocks[0]

    @property
    def keys(self) -> Tensor:
        return self._consolidated(self._keys)

    @property
    def value_grads(self) -> Tensor:
        return self._consolidated(self._value_grads)

    def micro_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(keys, value_grads)`` of each micro-batch in caching order (for normaliser updates)."""
        return zip(self.keys.split(self.micro_batch_rows), self.value_grads.split(self.micro_batch_rows))

    def chunks(self, chunk_size: int, *, device: Optional[DeviceLike] = None,
               dtype: torch.dtype = torch.float32) -> Iterator[tuple[Tensor, Tensor]]:
        """``(keys, value_grads)`` slices of at most ``chunk_size`` rows, moved to ``device``/``dtype``."""
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        keys, value_grads = self.keys, self.value_grads
        for start in range(0, self.n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            yield keys[rows].to(device=device, dtype=dtype), value_grads[rows].to(device=device, dtype=dtype)


def _capture_hook(name: str, rows: AnswerRows,
                  captured: dict[str, tuple[Tensor, Tensor]]) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
    """Forward hook storing the module input at the answer positions and its (grad-tracking) output."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if name in captured:
            raise RuntimeError(f"edit module {name!r} ran twice in one forward; only modules called once per "
                               f"token (linear layers of the decoder blocks) can be edited")
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise TypeError(f"edit module {name!r} must take and return a single tensor")
        inputs = args[0]
        if inputs.shape[:2] != rows.shape or output.shape[:2] != rows.shape:
            raise ValueError(f"edit module {name!r} saw input {tuple(inputs.shape)} / output {tuple(output.shape)}; "
                             f"expected [batch, seq, features] with [batch, seq] = {rows.shape}")
        if not output.requires_grad:
            output = output.detach().requires_grad_()
        captured[name] = (rows.gather(inputs.detach()), output)
        return output

    return hook


def _trace_micro_batch(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batch: Mapping[str, Tensor],
                       prefix: Optional[FrozenPrefix] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Keys and value gradients of every module for one micro-batch, on the modules' devices."""
    rows = AnswerRows(answer_mask(batch["labels"]))
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [module.register_forward_hook(_capture_hook(name, rows, captured)) for name, module in modules]
    try:
        with torch.enable_grad(), forward_context(prefix, batch):
            loss = answer_cross_entropy(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, _ in modules]
    missing = [name for name in names if name not in captured]
    if missing:
        raise ValueError(f"edit modules {missing} were not called by the model's forward; check edit_modules")
    grads = torch.autograd.grad(loss, [captured[name][1] for name in names], allow_unused=True)
    traced = {}
    for name, grad in zip(names, grads):
        if grad is None:
            raise ValueError(f"the answer loss does not depend on edit module {name!r}; check edit_modules")
        traced[name] = (captured[name][0], rows.gather(grad))
    return traced


def cache_keys_and_value_grads(model: nn.Module, modules: list[tuple[str, nn.Module]],
                               micro_batches: list[dict[str, Tensor]], *,
                               storage_device: DeviceLike = torch.device("cpu"),
                               storage_dtype: torch.dtype = torch.float32,
                               prefix: Optional[FrozenPrefix] = None) -> dict[str, ModuleCache]:
    """Trace every micro-batch once and return each module's cached rows, keyed by module name.

    Each micro-batch's value gradients are those of its own token-mean CE, so rows carry the
    ``1/#answer tokens`` factor of their micro-batch (spec §1.3 item 6). Weight ``.grad`` is untouched.
    ``prefix`` reuses the frozen layers' output of micro-batches it has seen (same result, fewer FLOPs).
    """
    if not modules:
        raise ValueError("no edit modules given; edit_modules must name at least one linear layer")
    names = [name for name, _ in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"edit module names must be unique, got {names}")
    if not micro_batches:
        raise ValueError("no micro-batches to cache; the edit requests are empty")
    for batch in micro_batches:
        check_micro_batch(batch)
    caches = {name: ModuleCache() for name in names}
    for batch in micro_batches:
        for name, (keys, value_grads) in _trace_micro_batch(model, modules, batch, prefix).items():
            caches[name].append(keys.to(device=storage_device, dtype=storage_dtype),
                                value_grads.to(device=storage_device, dtype=storage_dtype))
    return caches
