"""The MALMEN-family hyper-network (meta-editing spec §1.1, §1.2).

One network serves every edit module of one ``(d_in, d_out)`` shape; modules of the group share the
low-rank blocks and the normaliser statistics, and differ only in their per-module ``scale``/``shift``
embeddings, edit step size ``lr`` and ridge coefficient ``lamda``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from ..distributed import SINGLE, RowReduce

#: float32 machine epsilon; the references add it to the std so constant features do not divide by 0.
EPS_FP32 = float(torch.finfo(torch.float32).eps)

Shape = tuple[int, int]
#: Rows converted to float64 at a time by the normaliser's merge.
NORMALISER_ROWS = 4096


class RunningMeanStd(nn.Module):
    """Per-feature running mean/std of every row ever seen, merged batch-wise (Chan/Welford).

    The EMS merge is used because it is exact for any batch split and, unlike the RLEdit/MALMEN
    version, gives no NaN for a single-row batch (spec §1.2, §7 item 16).
    """

    n: Tensor
    mean: Tensor
    var: Tensor
    std: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"RunningMeanStd size must be positive, got {size}")
        self.size = size
        self.frozen = False
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    @contextlib.contextmanager
    def freeze(self) -> Iterator[None]:
        """Make :meth:`update` a no-op inside the block (edit time without moving statistics)."""
        previous = self.frozen
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = previous

    @torch.no_grad()
    def update(self, x: Tensor, reduce: RowReduce = SINGLE) -> None:
        """Merge the rows of ``x`` ([N, size]) into the statistics; empty batches are ignored.

        With ``reduce``, ``x`` is this rank's share of the batch and the batch statistics are those of
        the rows of all ranks (count, sum and squared deviations summed over ranks).
        """
        update_normalisers([(self, TensorColumns((x,)), None)], reduce)

    def _merge(self, m: Tensor, batch_mean: Tensor, batch_var: Tensor) -> None:
        """Chan's merge of a batch of ``m`` rows into the statistics, in float64 on the device (no host read)."""
        n = self.n.clone()
        n_new = n + m
        mean = self.mean.to(torch.float64)
        delta = batch_mean - mean
        m2 = self.var.to(torch.float64) * n + batch_var * m + delta.square() * (n * m / n_new)
        self.mean.copy_(mean + delta * (m / n_new))
        self.var.copy_(m2 / n_new.clamp(min=1.0))
        self.std.copy_(torch.sqrt(m2 / (n_new - 1.0 + 1e-8)))
        self.n.copy_(n_new)

    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``x`` with the current statistics (no update)."""
        return (x - self.mean) / (self.std + EPS_FP32)


class HyperBlock(nn.Module):
    """One residual block: ``h + scale[m] * relu(h A B + bias) + shift[m]``."""

    def __init__(self, hidden: int, rank: int, n_modules: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(hidden, rank))
        self.B = nn.Parameter(torch.zeros(rank, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.scale = nn.Embedding(n_modules, hidden)
        self.shift = nn.Embedding(n_modules, hidden)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, h: Tensor, module_idx: int) -> Tensor:
        # clamp(min=0), not relu: at init B = 0 and bias = 0 make every pre-activation exactly 0, where
        # relu's gradient is 0 (A, B, bias and scale would never train) but clamp's is 1, as in MALMEN.
        z = (h @ self.A @ self.B + self.bias).clamp(min=0)
        return self.scale.weight[module_idx] * z + self.shift.weight[module_idx] + h


class HyperNet(nn.Module):
    """Maps (keys, value_grads) rows of one module to pseudo keys and pseudo value gradients."""

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int,
                 lr_init: float) -> None:
        super().__init__()
        for field, value in (("key_size", key_size), ("value_size", value_size), ("rank", rank),
                             ("n_blocks", n_blocks), ("n_modules", n_modules)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HyperNet {field} must be a positive int, got {value!r}")
        self.key_size = key_size
        self.value_size = value_size
        self.n_modules = n_modules
        hidden = key_size + value_size
        self.normaliser = RunningMeanStd(hidden)
        self.blocks = nn.ModuleList(HyperBlock(hidden, rank, n_modules) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)
        nn.init.constant_(self.lr.weight, float(lr_init))
        nn.init.zeros_(self.lamda.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.lr.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lr.weight.device

    def _check_module_idx(self, module_idx: int) -> None:
        if not 0 <= module_idx < self.n_modules:
            raise IndexError(f"module_idx {module_idx} out of range for a network of {self.n_modules} modules")

    def update_normaliser(self, keys: Tensor, value_grads: Tensor, reduce: RowReduce = SINGLE) -> None:
        """Feed one batch of cached rows ``[keys; value_grads]`` into the running statistics (all ranks' rows)."""
        update_normalisers([self.normaliser_update(TensorColumns((keys, value_grads)))], reduce)

    def normaliser_update(self, rows: "RowSource") -> "NormaliserUpdate":
        """The update of the statistics with ``rows`` (read block by block), for :func:`update_normalisers`."""
        return self.normaliser, rows, self.dtype

    def forward(self, keys: Tensor, value_grads: Tensor, module_idx: int) -> tuple[Tensor, Tensor]:
        """Return ``(pseudo_keys, pseudo_value_grads)``; inputs are cast to the network's device/dtype."""
        self._check_module_idx(module_idx)
        if keys.shape[-1] != self.key_size or value_grads.shape[-1] != self.value_size:
            raise ValueError(f"HyperNet expects keys [..., {self.key_size}] and value_grads [..., {self.value_size}], "
                             f"got {tuple(keys.shape)} and {tuple(value_grads.shape)}")
        if keys.shape[:-1] != value_grads.shape[:-1]:
            raise ValueError(f"keys and value_grads must have the same rows, got {tuple(keys.shape)} "
                             f"and {tuple(value_grads.shape)}")
        h = torch.cat([keys.to(self.device, self.dtype), value_grads.to(self.device, self.dtype)], dim=-1)
        h = self.normaliser(h)
        for block in self.blocks:
            h = block(h, module_idx)
        return h[..., :self.key_size], h[..., self.key_size:]

    def edit_lr(self, module_idx: int) -> Tensor:
        """Per-module edit step size (scalar tensor carrying grad)."""
        self._check_module_idx(module_idx)
        return self.lr.weight[module_idx, 0]

    def lam(self, module_idx: int) -> Tensor:
        """Per-module ridge coefficient ``exp(lamda)`` (scalar tensor carrying grad)."""
        self._check_module_idx(module_idx)
        return self.lamda.weight[module_idx, 0].exp()


class RowSource(Protocol):
    """Rows ``[keys | value_grads]`` read block by block (a :class:`~.cache.ModuleCache`, or :class:`TensorColumns`)."""

    @property
    def n_rows(self) -> int: ...

    @property
    def width(self) -> int: ...

    def column_blocks(self, rows: int) -> Iterator[Sequence[Tensor]]:
        """Consecutive blocks of at most ``rows`` rows, each as its column parts side by side."""
        ...


class TensorColumns:
    """Column parts (e.g. ``(keys, value_grads)``) already in memory, as a :class:`RowSource`."""

    def __init__(self, parts: Sequence[Tensor]) -> None:
        shapes = [tuple(part.shape) for part in parts]
        if not parts or any(len(shape) != 2 or shape[0] != shapes[0][0] for shape in shapes):
            raise ValueError(f"column parts must be [N, width] matrices with one N, got shapes {shapes}")
        self.parts = parts

    @property
    def n_rows(self) -> int:
        return self.parts[0].shape[0]

    @property
    def width(self) -> int:
        return sum(part.shape[1] for part in self.parts)

    def column_blocks(self, rows: int) -> Iterator[Sequence[Tensor]]:
        for start in range(0, self.n_rows, rows):
            yield [part[start:start + rows] for part in self.parts]


#: One normaliser update: the normaliser, its rows, and the dtype the rows are cast to first (None = as they are).
NormaliserUpdate = tuple[RunningMeanStd, RowSource, Optional[torch.dtype]]


def _row_blocks(norm: RunningMeanStd, source: RowSource, dtype: Optional[torch.dtype]) -> Iterator[Tensor]:
    """float64 blocks of at most ``NORMALISER_ROWS`` rows of ``[parts[0] | parts[1] | ...]``, built one at a time."""
    for parts in source.column_blocks(NORMALISER_ROWS):
        block = [part.detach().to(dtype) if dtype is not None else part.detach() for part in parts]
        yield (torch.cat(block, dim=1) if len(block) > 1 else block[0]).to(norm.mean.device).double()


@torch.no_grad()
def update_normalisers(updates: Sequence[NormaliserUpdate], reduce: RowReduce = SINGLE) -> None:
    """Merge each batch of rows into its normaliser, in order (one normaliser may appear several times).

    The batch statistics are float64 sums over row blocks, so no float64 (or concatenated) copy of
    all rows is made. Across ranks the counts and sums of every update travel in one packed
    reduction and the squared deviations in a second; nothing is read back to the host.
    """
    live = []
    for norm, source, dtype in updates:
        if source.width != norm.size:
            raise ValueError(f"normaliser update expects rows of width {norm.size}, got width {source.width}")
        if not norm.frozen and (reduce.active or source.n_rows > 0):
            live.append((norm, source, dtype))
    if not live:
        return
    sums = [sum((block.sum(dim=0) for block in _row_blocks(*update)),
                torch.zeros(update[0].size, dtype=torch.float64, device=update[0].mean.device)) for update in live]
    # the row count rides in front of each sum (as a device tensor: ``float / tensor`` would round differently)
    counted = [torch.cat([torch.full((1,), float(source.n_rows), dtype=torch.float64, device=total.device), total])
               for (_, source, _), total in zip(live, sums)]
    reduce.sum_(counted)
    counts, sums = [c[0] for c in counted], [c[1:] for c in counted]
    means = [total / m for total, m in zip(sums, counts)]
    squares = [sum(((block - mean).square().sum(dim=0) for block in _row_blocks(*update)),
                   torch.zeros_like(mean)) for update, mean in zip(live, means)]
    reduce.sum_(squares)
    for (norm, _, _), m, mean, square in zip(live, counts, means, squares):
        norm._merge(m, mean, square / m)


def shape_key(shape: Shape) -> str:
    """Checkpoint/dict key of a shape group, e.g. ``"(4096, 14336)"`` as in the references."""
    return str((int(shape[0]), int(shape[1])))


def build_hypernets(shapes: list[Shape], rank: int, n_blocks: int, lr_init: float, *,
                    device: Optional[Union[str, torch.device]] = None) -> tuple[nn.ModuleDict, list[int]]:
    """One network per distinct ``(d_in, d_out)`` in first-occurrence order, plus each module's index.

    ``module_idx[i]`` counts the earlier modules of the same shape, so modules are numbered 0, 1, ...
    within their group (spec §1.1).
    """
    if not shapes:
        raise ValueError("build_hypernets needs at least one (d_in, d_out) shape; check edit_modules")
    counts: dict[Shape, int] = {}
    module_idx: list[int] = []
    for shape in shapes:
        if len(shape) != 2 or any(int(d) <= 0 for d in shape):
            raise ValueError(f"module shape must be a (d_in, d_out) pair of positive ints, got {shape!r}")
        key = (int(shape[0]), int(shape[1]))
        module_idx.append(counts.get(key, 0))
        counts[key] = counts.get(key, 0) + 1
    nets = nn.ModuleDict({
        shape_key(shape): HyperNet(shape[0], shape[1], rank, n_blocks, n_modules, lr_init)
        for shape, n_modules in counts.items()
    })
    if device is not None:
        nets.to(device)
    return nets, module_idx
