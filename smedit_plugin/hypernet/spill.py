"""Batch-sized state held in memory up to a budget, the rest in anonymous temporary files (issue 27.4).

What grows with the number of facts in one training unit or edit — the cached keys and value gradients
(spec §1.3), the locality reference logits and the frozen-prefix hidden states — goes through one
:class:`MemoryBudget`. Within the budget a tensor stays where it is (on the hypernetwork's device, the
GPU on CUDA); past it, it is written to an anonymous temporary file (deleted when closed, and by the
kernel if the process dies) and read back when used, as the reference implementations keep their whole
cache on disk. The bytes are copied, never rounded: results do not depend on the budget.

On the CPU the tensors kept in memory are copied into a few large slabs (:class:`HostArena`). Kept one by
one, thousands of small long-lived tensors sit between the forward and backward temporaries on the C
heap, which then cannot reuse or return the space between them: on SmolLM2 that fragmentation cost about
as much resident memory again as the rows themselves and grew with the batch.
"""
from __future__ import annotations

import tempfile
from typing import IO, Optional

import torch
from torch import Tensor

MB = 2 ** 20
#: bytes of one arena slab: above glibc's largest dynamic mmap threshold (32 MB on 64-bit), so every slab is
#: its own mapping (returned to the system when freed) and its untouched tail is never resident
SLAB_BYTES = 64 * MB
#: byte alignment of every tensor in a slab (enough for any dtype's view)
ALIGN = 64


class HostArena:
    """Copies long-lived CPU tensors into large slabs and hands out views of them.

    A slab is freed when the last view into it is dropped; the arena itself only holds the slab it is
    filling. Each holder (a module's cache, a pool of stored tensors) has its own arena, so what one holder
    releases is not kept alive by another's views. Tensors on other devices are returned unchanged (device
    allocators do not fragment this way).
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES) -> None:
        self.slab_bytes = slab_bytes
        self._slab: Optional[Tensor] = None
        self._used = 0

    def keep(self, tensor: Tensor) -> Tensor:
        """A copy of ``tensor`` inside a slab (same shape, dtype and values); non-CPU tensors as they are."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        span = -(-nbytes // ALIGN) * ALIGN
        if self._slab is None or self._used + span > self._slab.numel():
            self._slab = torch.empty(max(span, self.slab_bytes), dtype=torch.uint8)
            self._used = 0
        view = self._slab[self._used:self._used + nbytes].view(tensor.dtype).view(tensor.shape)
        with torch.no_grad():
            view.copy_(tensor.detach())
        self._used += span
        return view


class SpillFile:
    """An anonymous temporary file that tensors are appended to and read back from, in any dtype."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="smedit-spill-", dir=directory)
        self.size = 0

    def write(self, tensor: Tensor) -> int:
        """Append ``tensor``'s bytes; returns their offset."""
        offset = self.size
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(offset)
        self._file.write(memoryview(data))
        self.size += data.nbytes
        return offset

    def read(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The ``shape``/``dtype`` tensor whose bytes start at ``offset``, as a new CPU tensor."""
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        self._file.seek(offset)
        if self._file.readinto(memoryview(buffer)) != buffer.nbytes:
            raise OSError(f"spill file ended early reading {buffer.nbytes} bytes at offset {offset}")
        return out

    def close(self) -> None:
        self._file.close()


class MemoryBudget:
    """Bytes of batch-sized state one training unit or edit keeps in memory; what does not fit is spilled.

    ``limit_mb=None`` keeps everything in memory. Holders :meth:`reserve` bytes before keeping a tensor
    and :meth:`release` them when they drop it; :meth:`spill_file` opens a file in ``directory``
    (None: the system's temporary directory) for what is refused.
    """

    def __init__(self, limit_mb: Optional[float] = None, directory: Optional[str] = None) -> None:
        if limit_mb is not None and not limit_mb >= 0:
            raise ValueError(f"cache_memory_mb must be >= 0 or null, got {limit_mb!r}")
        self.limit = None if limit_mb is None else int(limit_mb * MB)
        self.directory = directory
        self.used = 0
        #: bytes written to spill files so far (what the budget refused)
        self.spilled = 0

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` as held in memory and return True, or return False when they do not fit."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes

    def spill_file(self) -> SpillFile:
        return SpillFile(self.directory)


def unlimited() -> MemoryBudget:
    """A budget that keeps everything in memory (callers that pass none)."""
    return MemoryBudget(None)


class Stored:
    """One tensor kept in memory within a budget, or written to a spill file when it does not fit.

    :meth:`get` returns it (on its original device); :meth:`release` drops it and returns its bytes.
    """

    def __init__(self, tensor: Tensor, budget: MemoryBudget, spill: Optional["SpillPool"] = None) -> None:
        self._budget = budget
        self.nbytes = tensor.numel() * tensor.element_size()
        self.shape, self.dtype, self.device = tuple(tensor.shape), tensor.dtype, tensor.device
        self._tensor: Optional[Tensor] = None
        self._where: Optional[tuple[SpillFile, int]] = None
        if budget.reserve(self.nbytes):
            self._tensor = spill.keep(tensor) if spill is not None else tensor
        else:
            pool = spill if spill is not None else SpillPool(budget)
            file = pool.file()
            self._where = (file, file.write(tensor))
            budget.spilled += self.nbytes

    @property
    def in_memory(self) -> bool:
        return self._tensor is not None

    def get(self) -> Tensor:
        if self._tensor is not None:
            return self._tensor
        if self._where is None:
            raise RuntimeError("this stored tensor was released")
        file, offset = self._where
        return file.read(offset, self.shape, self.dtype).to(self.device, non_blocking=True)

    def release(self) -> None:
        if self._tensor is not None:
            self._budget.release(self.nbytes)
        self._tensor = None
        self._where = None


class SpillPool:
    """One spill file shared by many :class:`Stored` tensors, opened on first use and closed by :meth:`close`,
    and one arena for the ones kept in memory (their own slabs, so they are freed with them)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._file: Optional[SpillFile] = None
        self._arena = HostArena()

    def keep(self, tensor: Tensor) -> Tensor:
        """What a :class:`Stored` of this pool holds in memory: on the CPU a copy in the pool's own slabs."""
        return self._arena.keep(tensor)

    def file(self) -> SpillFile:
        if self._file is None:
            self._file = self._budget.spill_file()
        return self._file

    def store(self, tensor: Tensor) -> Stored:
        return Stored(tensor, self._budget, self)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

