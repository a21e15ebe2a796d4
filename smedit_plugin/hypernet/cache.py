"""Caching of keys and value gradients at the answer tokens (meta-editing spec §1.3, §8.1, §8.12).

Keys are the edit modules' inputs and value gradients are ``∂CE/∂output`` at the positions whose logits
predict answer tokens. The references write both to disk with ``torch.save`` and get the gradients
through a full ``.backward()`` into the weights; here they stay in memory within a
:class:`~.spill.MemoryBudget` (the rest goes to a spill file), are read in chunks of rows, and come from
``torch.autograd.grad`` on the hooked outputs, which skips every weight-gradient GEMM.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..answers import AnswerRows, check_micro_batch
from ..text import answer_mask
from .losses import answer_cross_entropy
from .prefix import FrozenPrefix, forward_context
from .spill import HostArena, MemoryBudget, SpillFile

DeviceLike = Union[str, torch.device]


class ModuleCache:
    """Cached rows of one edit module: ``keys [N, d_in]`` and ``value_grads [N, d_out]``, read in chunks.

    Rows are appended per micro-batch, (example, position) row-major; ``micro_batch_rows`` remembers
    the split. They stay in memory (where they were produced) while ``budget`` has room; from the first
    micro-batch that does not fit, this module's rows go to two spill files (keys, value gradients), so
    the rows are a memory part followed by a file part and :meth:`chunks` reads back exactly what was
    appended. :meth:`release` drops the rows and returns their bytes to the budget.
    """

    def __init__(self, budget: Optional[MemoryBudget] = None) -> None:
        self.micro_batch_rows: list[int] = []
        self._budget = budget if budget is not None else MemoryBudget(None)
        self._blocks: list[tuple[Tensor, Tensor]] = []
        self._starts: list[int] = []  # first row of each in-memory block
        self._memory_rows = 0
        self._reserved = 0
        self._files: Optional[tuple[SpillFile, SpillFile]] = None
        self._layout: Optional[tuple[int, int, torch.dtype, torch.device]] = None  # d_in, d_out, dtype, device
        self._arena = HostArena()  # in-memory rows live in this cache's own slabs (see spill.py)

    @classmethod
    def of(cls, keys: Tensor, value_grads: Tensor) -> "ModuleCache":
        """A cache holding ``keys``/``value_grads`` (already in memory) as one block."""
        cache = cls()
        cache.append(keys, value_grads)
        return cache

    def append(self, keys: Tensor, value_grads: Tensor) -> None:
        """Add one micro-batch of rows."""
        if keys.dim() != 2 or value_grads.dim() != 2 or keys.shape[0] != value_grads.shape[0]:
            raise ValueError(f"keys [N, d_in] and value_grads [N, d_out] need the same N, got "
                             f"{tuple(keys.shape)} and {tuple(value_grads.shape)}")
        layout = (keys.shape[1], value_grads.shape[1], keys.dtype, keys.device)
        if value_grads.dtype != keys.dtype or value_grads.device != keys.device:
            raise ValueError("keys and value_grads must have one dtype and device")
        if self._layout is not None and layout[:2] != self._layout[:2]:
            raise ValueError("appended rows have a different width than the cached ones")
        if self._layout is not None and layout[2:] != self._layout[2:]:
            raise ValueError("appended rows have a different dtype or device than the cached ones")
        self._layout = layout
        rows = keys.shape[0]
        nbytes = (keys.numel() + value_grads.numel()) * keys.element_size()
        if self._files is None and self._budget.reserve(nbytes):
            self._starts.append(self._memory_rows)
            self._blocks.append((self._arena.keep(keys), self._arena.keep(value_grads)))
            self._memory_rows += rows
            self._reserved += nbytes
        else:
            if self._files is None:
                self._files = (self._budget.spill_file(), self._budget.spill_file())
            self._files[0].write(keys)
            self._files[1].write(value_grads)
            self._budget.spilled += nbytes
        self.micro_batch_rows.append(rows)

    @property
    def n_rows(self) -> int:
        return sum(self.micro_batch_rows)

    @property
    def key_size(self) -> int:
        return self._checked_layout()[0]

    @property
    def value_size(self) -> int:
        return self._checked_layout()[1]

    @property
    def width(self) -> int:
        """Columns of a ``[keys | value_grads]`` row (what a normaliser sees)."""
        return self.key_size + self.value_size

    @property
    def spilled_rows(self) -> int:
        """Rows held in the spill files rather than in memory."""
        return self.n_rows - self._memory_rows

    def _checked_layout(self) -> tuple[int, int, torch.dtype, torch.device]:
        if self._layout is None:
            raise ValueError("the module cache is empty; run cache_keys_and_value_grads first")
        return self._layout

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``(keys, value_grads)`` of rows ``start`` to ``stop``, on the device and in the dtype they were cached in."""
        d_in, d_out, dtype, device = self._checked_layout()
        if not 0 <= start < stop <= self.n_rows:
            raise IndexError(f"rows {start}:{stop} out of range for a cache of {self.n_rows} rows")
        keys, grads = [], []
        first = max(0, bisect.bisect_right(self._starts, start) - 1)
        for begin, (k, g) in zip(self._starts[first:], self._blocks[first:]):
            if begin >= stop:
                break
            part = slice(max(start - begin, 0), min(stop - begin, k.shape[0]))
            if part.start < part.stop:
                keys.append(k[part])
                grads.append(g[part])
        if stop > self._memory_rows and self._files is not None:
            a, b = max(start, self._memory_rows) - self._memory_rows, stop - self._memory_rows
            size = torch.empty((), dtype=dtype).element_size()
            keys.append(self._files[0].read(a * d_in * size, (b - a, d_in), dtype).to(device, non_blocking=True))
            grads.append(self._files[1].read(a * d_out * size, (b - a, d_out), dtype).to(device, non_blocking=True))
        if len(keys) == 1:
            return keys[0], grads[0]
        return torch.cat(keys), torch.cat(grads)

    def _all_rows(self) -> tuple[Tensor, Tensor]:
        """Every row; in-memory blocks are merged into one the first time, as later reads reuse it."""
        if self._files is None and len(self._blocks) > 1:
            self._blocks = [self.rows(0, self.n_rows)]
            self._starts = [0]
            self._arena = HostArena()  # the merged rows replace the slabs; do not keep the last one alive
        return self.rows(0, self.n_rows)

    @property
    def keys(self) -> Tensor:
        """All keys as one tensor (read back from the spill file if needed; prefer :meth:`chunks` for large caches)."""
        return self._all_rows()[0]

    @property
    def value_grads(self) -> Tensor:
        """All value gradients as one tensor (read back from the spill file if needed)."""
        return self._all_rows()[1]

    def micro_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(keys, value_grads)`` of each micro-batch in caching order."""
        start = 0
        for rows in self.micro_batch_rows:
            yield self.rows(start, start + rows)
            start += rows

    def chunks(self, chunk_size: int, *, device: Optional[DeviceLike] = None,
               dtype: Optional[torch.dtype] = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(keys, value_grads)`` of consecutive ``chunk_size`` rows (the last may be shorter), moved to ``device``/``dtype``."""
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        n_rows = self.n_rows
        for start in range(0, n_rows, chunk_size):
            keys, value_grads = self.rows(start, min(start + chunk_size, n_rows))
            yield keys.to(device=device, dtype=dtype), value_grads.to(device=device, dtype=dtype)

    def column_blocks(self, rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(keys, value_grads)`` blocks of ``rows`` rows, as normalisers read them (:class:`~.network.RowSource`)."""
        return self.chunks(rows)

    def release(self) -> None:
        """Drop every row and return the in-memory bytes to the budget (the cache is empty afterwards)."""
        self._budget.release(self._reserved)
        self._reserved = 0
        self._blocks, self._starts, self._memory_rows = [], [], 0
        self._arena = HostArena()
        if self._files is not None:
            for file in self._files:
                file.close()
            self._files = None
        self.micro_batch_rows = []
        self._layout = None


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
                               prefix: Optional[FrozenPrefix] = None,
                               budget: Optional[MemoryBudget] = None) -> dict[str, ModuleCache]:
    """Trace every micro-batch once and return each module's cached rows, keyed by module name.

    Each micro-batch's value gradients are those of its own token-mean CE, so rows carry the
    ``1/#answer tokens`` factor of their micro-batch (spec §1.3 item 6). Weight ``.grad`` is untouched.
    ``prefix`` reuses the frozen layers' output of micro-batches it has seen (same result, fewer FLOPs).
    Rows past ``budget`` (default: none) go to spill files; the values are the same either way.
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
    caches = {name: ModuleCache(budget) for name in names}
    for batch in micro_batches:
        for name, (keys, value_grads) in _trace_micro_batch(model, modules, batch, prefix).items():
            caches[name].append(keys.to(device=storage_device, dtype=storage_dtype),
                                value_grads.to(device=storage_device, dtype=storage_dtype))
    return caches
