"""Data-parallel hypernetwork training on ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Each rank holds a full copy of the model and runs the LLM passes of its share of every batch's
micro-batches (micro-batch ``k`` goes to rank ``k % world_size``; the micro-batches themselves are the
single-process ones, so every per-micro-batch token mean is unchanged). Everything the hypernetwork
needs from the whole batch is a sum over rows or over micro-batches, and only those sums travel:

* the normaliser's batch statistics (row count, sum, sum of squared deviations),
* the ridge system ``KᵀK`` and right-hand side ``KᵀD`` of each module (always the primal form, whose
  size does not depend on the batch),
* the meta-loss weight gradients ``∂L/∂W`` of each module,
* the hypernetwork gradients (summed, then every rank takes the same Adam step).

So the shift, the solve and the update do not depend on the number of ranks (up to float rounding).
A single process never touches this module's collectives: :data:`SINGLE` reduces nothing.

Every collective's input is on the rank's device (NCCL takes CUDA tensors only): a tensor held
elsewhere (a hypernetwork on the CPU, say) travels through a copy there and back. Many tensors
summed together (the hypernetwork gradients of an Adam step, the meta-loss gradients, the
normalisers' statistics) are packed into flat buffers of up to :data:`BUCKET_BYTES`, one
collective each, as DDP buckets gradients. On two ranks a packed sum is bit-identical to one
collective per tensor (each element is ``a + b`` either way); on more ranks the backend may add an
element's terms in another order, which moves it by float rounding only.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from .errors import SettingsMismatchError, short_repr

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before the run fails (``SMEDIT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 600
#: Largest flat buffer one packed all-reduce sends; a bigger tensor is reduced alone, without a copy.
BUCKET_BYTES = 64 * 2 ** 20


def buckets(tensors: Sequence[Tensor], cap_bytes: Optional[int] = None) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``tensors`` of one device and dtype, each of at most ``cap_bytes`` (default
    :data:`BUCKET_BYTES`) or a single tensor."""
    cap_bytes = BUCKET_BYTES if cap_bytes is None else cap_bytes
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and ((tensor.device, tensor.dtype) != (bucket[0].device, bucket[0].dtype)
                       or size + nbytes > cap_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


class RowReduce:
    """Sums across the ranks of one data-parallel run; the identity when ``world_size == 1``."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        self.rank = rank
        self.world_size = world_size
        #: where every collective's input lives (the rank's GPU under NCCL); None = wherever the tensor is
        self.device = torch.device(device) if device is not None else None

    @property
    def active(self) -> bool:
        """True when there are other ranks to sum with."""
        return self.world_size > 1

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that writes files, logs and adds batch-global terms once."""
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (a new tensor on the input's device; the input is left as it was)."""
        if not self.active:
            return tensor
        out = tensor.detach().to(self.device or tensor.device, copy=True, memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(tensor.device)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over ranks in place, packed into flat buffers of up to :data:`BUCKET_BYTES`."""
        if not self.active:
            return
        for bucket in buckets(tensors):
            first = bucket[0]
            if len(bucket) == 1 and first.is_contiguous() and first.device == (self.device or first.device):
                torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.SUM)
                continue
            flat = torch.cat([t.detach().reshape(-1) for t in bucket]).to(self.device or first.device)
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                tensor.detach().copy_(part.view(tensor.shape).to(tensor.device))

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th one starting at ``rank``."""
        return list(items[self.rank::self.world_size])

    def check_shardable(self, n_items: int, what: str) -> None:
        """Every rank needs at least one micro-batch: say which setting to change when it would not get one."""
        if self.active and n_items < self.world_size:
            raise ValueError(f"{what}: {n_items} micro-batches for {self.world_size} ranks; every rank needs at least "
                             f"one (raise n_edits or lower micro_batch_size or the number of processes)")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def check_same(self, fields: dict[str, Any], what: str) -> None:
        """Every rank's ``fields`` equal rank 0's, else every rank raises :class:`SettingsMismatchError`.

        Called before any collective whose size depends on these settings (another hypernetwork rank would
        otherwise die in a gloo "connection reset", another ``reg_coef`` would train rank 0's meta silently).
        Rank 0's message names each rank and field that differ; the other ranks say that rank 0 reports.
        """
        if not self.active:
            return
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, fields)
        first = gathered[0]
        differences = [f"rank {rank}: {key} = {short_repr(theirs.get(key))} (rank 0: {short_repr(first.get(key))})"
                       for rank, theirs in enumerate(gathered) if rank
                       for key in sorted(set(first) | set(theirs)) if theirs.get(key) != first.get(key)]
        if not differences:
            return
        if self.is_first:
            raise SettingsMismatchError(
                f"the data-parallel ranks were started with different {what}; every rank must get the same:\n  - "
                + "\n  - ".join(differences) + "\n(torchrun / accelerate run one command per rank: check per-node "
                "files, environment variables and command lines). Nothing was trained or written")
        raise SettingsMismatchError(f"rank {self.rank}: the data-parallel ranks were started with different {what}; "
                                    "rank 0 reports which")

    def decided_by_first(self, value: T) -> T:
        """Rank 0's ``value`` on every rank: one decision taken from rank 0's view of the files (on several
        nodes the other ranks may not see the same disk, and disagreeing ranks would wait on each other)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


#: The reducer of a single process.
SINGLE = RowReduce()


def launched_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun and accelerate set; ``(0, 1, 0)`` otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def init_from_environment(timeout_s: Optional[float] = None) -> tuple[RowReduce, Optional[torch.device]]:
    """Join the process group a launcher set up (NCCL on CUDA, gloo on CPU), or return :data:`SINGLE`.

    Returns the reducer and, under a launcher, this rank's device (``cuda:LOCAL_RANK`` when CUDA is
    present, else the CPU). Collectives time out after ``timeout_s`` (default ``SMEDIT_DIST_TIMEOUT`` or
    600 s), so a rank that died cannot leave the others waiting forever.
    """
    rank, world, local_rank = launched_world()
    if world == 1:
        return SINGLE, None
    if timeout_s is None:
        timeout_s = float(os.environ.get("SMEDIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; start at "
                               "most one process per GPU (torchrun --nproc_per_node)")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return RowReduce(torch.distributed.get_rank(), torch.distributed.get_world_size(), device), device


def shutdown(reduce: RowReduce) -> None:
    """Leave the process group (no-op in a single process)."""
    if reduce.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
