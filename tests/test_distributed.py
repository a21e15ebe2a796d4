"""Data-parallel training on torch.distributed (gloo, 2 processes on CPU) gives what one process gives.

The workers live in tests/distributed_workers.py (spawned children import them from there).
"""
from __future__ import annotations

import torch

from distributed_workers import math_case, run_ranks, shift_and_meta_grad
from smedit_plugin.hypernet.distributed import SINGLE, RowReduce


def test_row_reduce_of_one_process_is_the_identity() -> None:
    t = torch.arange(4.0)
    assert SINGLE.sum(t) is t and not SINGLE.active and SINGLE.is_first
    assert RowReduce(1, 3).shard(list(range(8))) == [1, 4, 7]
    try:
        RowReduce(0, 2).check_shardable(1, "SMEdit training batch")
    except ValueError as exc:
        assert "every rank needs at least one" in str(exc) and "micro_batch_size" in str(exc)
    else:
        raise AssertionError("one micro-batch for two ranks was accepted")


def test_shift_normaliser_and_meta_gradient_from_rows_split_over_two_ranks(tmp_path) -> None:
    out = tmp_path / "rank0.pt"
    run_ranks(2, shift_and_meta_grad, str(out))
    split = torch.load(out)
    whole = math_case(SINGLE)
    assert split.keys() == whole.keys()
    for name, value in whole.items():  # float32 sums in another order: equal to ~1e-6 of each tensor's scale
        torch.testing.assert_close(split[name], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()), msg=name)
    assert whole["grad.lamda.weight"].abs().sum() > 0  # the lambda term is in the total once, not twice
