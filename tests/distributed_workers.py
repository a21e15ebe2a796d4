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
        # every rank done with its collectives before any closes its connections: a rank that tears the group down
        # while a peer still reads (all_gather_object is two collectives) aborts that peer in gloo
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():  # code under test may have left the group already
            torch.distributed.destroy_process_group()


def math_case(reduce) -> dict[str, torch.Tensor]:
    """One module's shift, and the hypernetwork gradient of a fixed meta-gradient, from this rank's rows.

    The same 37 rows (d_in 6 < 37, so one process would pick the primal form too) are made on every
    rank from a fixed seed; rank r keeps rows r, r + world, ...
    """
    from smedit_plugin.hypernet.network import HyperNet
    from smedit_plugin.hypernet.cache import ModuleCache
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
    rows = ModuleCache.of(keys[mine], value_grads[mine])
    shift, solver = predict_param_shift(net, 1, rows, chunk_size=4, reduce=reduce)
    accumulate_meta_grad(net, 1, rows, solver, shift, weight_grad, chunk_size=4, reduce=reduce)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    reduce.sum_(grads)
    return {"shift": shift, "mean": net.normaliser.mean.clone(), "std": net.normaliser.std.clone(),
            **{f"grad.{name}": g for (name, _), g in zip(net.named_parameters(), grads)}}


def shift_and_meta_grad(rank: int, world_size: int, out: str) -> None:
    """:func:`math_case` with the rows split over the ranks; rank 0 saves the results."""
    from smedit_plugin.distributed import RowReduce

    result = math_case(RowReduce(rank, world_size))
    if rank == 0:
        torch.save(result, Path(out))


MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
CASES = {
    # batch, 4 micro-batches: 2 per rank
    "SMEdit": dict(alg="SMEdit", n_edits=8, micro_batch_size=2),
    # batch, 3 micro-batches: an uneven last shard (2 on rank 0, 1 on rank 1); KL locality term
    "MALMEN2": dict(alg="MALMEN2", n_edits=6, micro_batch_size=2),
    # sequential trajectories of 3 batches, memory backtracking, KL and l2 terms, one Adam step per trajectory
    "RLEdit2": dict(alg="RLEdit2", n_edits=4, micro_batch_size=2, num_seq=3, back_depth=2),
}


def case_hparams(name: str):
    """Tiny-model training hparams of one case (3 training units)."""
    from smedit_plugin.resolve import hparams_class

    spec = dict(CASES[name])
    alg = spec.pop("alg")
    return hparams_class(alg)(alg_name=alg, model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2,
                                  lr=1e-2, meta_lr=1e-3, chunk_size=3, max_steps=3, **spec)


def train_case(rank: int, world_size: int, name: str, data: str, out: str, fail_at_unit: int = 0) -> None:
    """Train one case with ``train_hypernet`` on every rank (rank 0 writes ``out``); optionally fail on rank 1.

    Rank 0 also saves the hypernetwork gradients Adam receives at each step to ``out + ".grads.pt"``.
    """
    from smedit_plugin.records import load_records
    from smedit_plugin.distributed import RowReduce
    from smedit_plugin.hypernet.training import train_hypernet
    from smedit_plugin.hypernet.trainer import MetaTrainer
    from smedit_plugin.testing import tiny_model

    model, tok = tiny_model("smollm2", n_layers=4)
    records = load_records(Path(data), "zsre", limit=48)
    hp = case_hparams(name)
    if fail_at_unit:
        hp = hp.replace(val_interval=1, max_steps=-1)
        if rank == 1:
            original = MetaTrainer._train_batch

            def failing(self, batch):
                if self.state.units_done + 1 == fail_at_unit:
                    raise RuntimeError(f"injected failure on rank 1 in unit {fail_at_unit}")
                return original(self, batch)

            MetaTrainer._train_batch = failing
    original_step = torch.optim.Adam.step
    saved: list[list[torch.Tensor]] = []

    def step(self, *args, **kwargs):
        saved.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        if rank == 0:
            torch.save(saved, out + ".grads.pt")
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = step
    try:
        train_hypernet(model, tok, hp, records, out, model_name="tiny-smollm2", progress=False,
                       reduce=RowReduce(rank, world_size))
    finally:
        torch.optim.Adam.step = original_step


def compare_case(rank: int, world_size: int, train_data: str, eval_data: str, root: str, out: str) -> None:
    """``run_compare`` as ``smedit compare`` runs it under torchrun: every rank trains, rank 0 edits and scores.

    Each rank writes how often it trained and with how many ranks to ``out + ".rank<r>.json"``; rank 0
    also writes its rows to ``out``.
    """
    import json

    from smedit_plugin.compare import run_compare
    from smedit_plugin.hypernet import training as runner
    from smedit_plugin.testing import tiny_model

    trained: list[int] = []
    original = runner.train_hypernet

    def counting(*args, **kwargs):
        trained.append(kwargs["reduce"].world_size)
        return original(*args, **kwargs)

    runner.train_hypernet = counting
    model, tok = tiny_model("smollm2")
    rows = run_compare(compare_config(train_data, eval_data, root), model=model, tok=tok)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"trained": trained, "rows": len(rows),
                                                          "in_group": torch.distributed.is_initialized()}))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def compare_config(train_data: str, eval_data: str, root: str):
    """SMEdit and MALMEN2 batch editing of 8 facts with archives trained on 16 records (4 micro-batches a batch)."""
    from smedit_plugin.compare import CompareConfig

    return CompareConfig(model="smollm2-135m", dataset="zsre", train_data=Path(train_data), eval_data=Path(eval_data),
                         methods=["SMEdit", "MALMEN2[micro_batch_size=2]"], protocol="batch", n_edits=8,
                         archive_root=Path(root), progress=False)


def mismatch_case(rank: int, world_size: int, data: str, out: str, field: str, value, report: str) -> None:
    """``train_hypernet`` on every rank, rank 1 with ``field = value``; each rank reports how it ended to
    ``report + ".rank<r>.json"`` (so the test sees rank 0's own message, not whichever rank failed first)."""
    import json

    from smedit_plugin.records import load_records
    from smedit_plugin.distributed import RowReduce
    from smedit_plugin.hypernet.training import train_hypernet
    from smedit_plugin.testing import tiny_model

    model, tok = tiny_model("smollm2", n_layers=4)
    hp = case_hparams("SMEdit")
    if rank == 1:
        hp = hp.replace(**{field: value})
    try:
        train_hypernet(model, tok, hp, load_records(Path(data), "zsre", limit=48), out, model_name="tiny-smollm2",
                       progress=False, reduce=RowReduce(rank, world_size))
        outcome = {"ok": True}
    except Exception as exc:  # reported, not raised: the test compares the ranks' messages
        outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(outcome))
class PerTensorReduce:
    """The reducer before packing: one all-reduce per tensor (the reference for the bit-identity test)."""

    def __new__(cls, rank: int, world_size: int):
        from smedit_plugin.distributed import RowReduce

        class _PerTensor(RowReduce):
            def sum_(self, tensors) -> None:
                for tensor in tensors:
                    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

        return _PerTensor(rank, world_size)


def packed_sums(rank: int, world_size: int, out: str) -> None:
    """``RowReduce.sum_`` over tensors of mixed dtype, layout and size (buckets of 256 bytes) against one
    all-reduce per tensor; rank 0 saves both results."""
    from smedit_plugin import distributed

    distributed.BUCKET_BYTES = 256
    gen = torch.Generator().manual_seed(10 + rank)
    made = [torch.randn(5, 7, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen),
            torch.randn(6, 4, generator=gen).T, torch.randn(200, generator=gen), torch.randn(2, 3, generator=gen),
            torch.randn((), dtype=torch.float64, generator=gen)]
    packed = [t.clone() for t in made]
    distributed.RowReduce(rank, world_size).sum_(packed)
    one_by_one = [t.clone().contiguous() for t in made]
    for tensor in one_by_one:
        torch.distributed.all_reduce(tensor)
    if rank == 0:
        torch.save({"packed": packed, "per_tensor": one_by_one, "strides": [t.stride() for t in packed],
                    "made_strides": [t.stride() for t in made]}, Path(out))


def train_packed_and_per_tensor(rank: int, world_size: int, data: str, out: str) -> None:
    """Each case trained on the same ranks with the packed reducer and with one all-reduce per tensor."""
    from smedit_plugin.records import load_records
    from smedit_plugin.distributed import RowReduce
    from smedit_plugin.hypernet.trainer import MetaTrainer
    from smedit_plugin.testing import tiny_model

    records = load_records(Path(data), "zsre", limit=48)
    results = {}
    for case in ("SMEdit", "RLEdit2"):
        for name, reducer in (("packed", RowReduce), ("per_tensor", PerTensorReduce)):
            model, tok = tiny_model("smollm2", n_layers=4)
            hp = case_hparams(case).replace(max_steps=2)
            torch.manual_seed(hp.seed)
            trainer = MetaTrainer(model, tok, hp, reduce=reducer(rank, world_size))
            state = trainer.train(records, progress=False)
            results[(case, name)] = ({k: v.detach().clone() for k, v in trainer.editor.state_dict().items()},
                                     [entry["loss"] for entry in state.history])
    if rank == 0:
        torch.save(results, Path(out))
