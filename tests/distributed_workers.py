"""Code run inside the gloo worker processes of tests/test_distributed.py (importable by spawned children)."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Callable

import torch


def run_ranks(world_size: int, target: Callable[..., None], *args) -> None:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` gloo processes; raise if any of them failed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_entry, args=(world_size, port, target, args), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, port: int, target: Callable[..., None], args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        target(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def math_case(reduce) -> dict[str, torch.Tensor]:
    """One module's shift, and the hypernetwork gradient of a fixed meta-gradient, from this rank's rows.

    The same 37 rows (d_in 6 < 37, so one process would pick the primal form too) are made on every
    rank from a fixed seed; rank r keeps rows r, r + world, ...
    """
    from smedit_plugin.hypernet.network import HyperNet
    from smedit_plugin.hypernet.shifts import accumulate_meta_grad, predict_param_shift

    gen = torch.Generator().manual_seed(0)
    keys, value_grads = torch.randn(37, 6, generator=gen), torch.randn(37, 5, generator=gen)
    weight_grad = torch.randn(6, 5, generator=gen)
    torch.manual_seed(0)
    net = HyperNet(6, 5, rank=3, n_blocks=2, n_modules=2, lr_init=0.1)
    with torch.no_grad():
        for block in net.blocks:
            block.B.normal_(generator=gen)
        net.lamda.weight.fill_(0.3)
    mine = slice(reduce.rank, None, reduce.world_size)
    net.update_normaliser(keys[mine], value_grads[mine], reduce=reduce)
    shift, solver, _ = predict_param_shift(net, 1, keys[mine], value_grads[mine], chunk_size=4, reduce=reduce)
    accumulate_meta_grad(net, 1, keys[mine], value_grads[mine], solver, shift, weight_grad, chunk_size=4,
                         reduce=reduce)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    reduce.sum_(grads)
    return {"shift": shift, "mean": net.normaliser.mean.clone(), "std": net.normaliser.std.clone(),
            **{f"grad.{name}": g for (name, _), g in zip(net.named_parameters(), grads)}}


def shift_and_meta_grad(rank: int, world_size: int, out: str) -> None:
    """:func:`math_case` with the rows split over the ranks; rank 0 saves the results."""
    from smedit_plugin.hypernet.distributed import RowReduce

    result = math_case(RowReduce(rank, world_size))
    if rank == 0:
        torch.save(result, Path(out))
