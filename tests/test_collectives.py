"""Collectives of data-parallel hypernetwork training: every input on the rank's device, packed into buckets.

NCCL takes CUDA tensors only, so a host tensor in an all-reduce crashes the first step on GPUs; the
gloo tests cannot see it. Here the model sits on the fake GPUs of ``tests/spread_devices.py`` and
``torch.distributed.all_reduce`` records where each input lives. Packing many tensors into one flat
buffer must not change a bit on gloo (2 ranks): compared against one all-reduce per tensor.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from distributed_workers import packed_sums, run_ranks, train_packed_and_per_tensor
from smedit_plugin.records import load_records
from smedit_plugin import distributed
from smedit_plugin.distributed import RowReduce, buckets
from smedit_plugin.hypernet.trainer import MetaTrainer
from smedit_plugin.resolve import hparams_class
from smedit_plugin.testing import tiny_model
from smedit_plugin.tfcompat import transformers_version
from spread_devices import GPUS, fake_gpus, spread

SECOND_HALF = ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]
needs_tf5 = pytest.mark.skipif(transformers_version().major < 5,
                               reason="fake-GPU harness needs transformers >= 5 (4.x rotary autocast rejects meta)")


def _record_collectives(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """``all_reduce`` replaced by a recorder of its input's device (the peer rank's share is zero)."""
    seen: list[torch.device] = []

    def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op: bool = False) -> None:
        seen.append(tensor.device)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return seen


@needs_tf5
@pytest.mark.parametrize("alg,extra", [("SMEdit", {}), ("MALMEN2", {}),
                                       ("RLEdit2", {"num_seq": 2, "back_depth": 2})])
@pytest.mark.parametrize("rank_device", [None, GPUS[0]], ids=["tensors-where-they-are", "rank-device-set"])
def test_every_collective_input_of_a_training_unit_is_on_a_gpu(monkeypatch, zsre_train_path, alg: str, extra: dict,
                                                               rank_device: Optional[torch.device]) -> None:
    """A model spread over two fake GPUs, 2 ranks: no all-reduce input is a host tensor (NCCL would refuse it);
    with the rank's device given, every input is on that device."""
    seen = _record_collectives(monkeypatch)
    records = load_records(zsre_train_path, "zsre", limit=8)
    hp = hparams_class(alg)(alg_name=alg, model_name="tiny-llama", edit_modules=MODULES, rank=4,
                                          n_blocks=2, lr=1e-2, meta_lr=1e-3, n_edits=4, micro_batch_size=1,
                                          chunk_size=3, max_steps=1, val_fraction=0.0, **extra)
    model, tok = tiny_model("llama3", n_layers=4)
    with fake_gpus():
        spread(model, SECOND_HALF)
        reduce = RowReduce(0, 2) if rank_device is None else RowReduce(0, 2, device=rank_device)
        MetaTrainer(model, tok, hp, reduce=reduce).train(records, progress=False)
    assert seen, "no collective ran"
    hosts = [d for d in seen if d.type == "cpu"]
    assert not hosts, f"{len(hosts)} of {len(seen)} all-reduce inputs are host tensors"
    if rank_device is not None:
        assert set(seen) == {rank_device}
    else:
        assert set(seen) <= set(GPUS)


def test_buckets_keep_order_and_split_at_the_cap_and_at_a_dtype_change() -> None:
    f32 = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(1000)]
    f64 = [torch.zeros(4, dtype=torch.float64)]
    runs = list(buckets(f32[:2] + f64 + f32[2:], cap_bytes=100))
    assert [[t.numel() for t in run] for run in runs] == [[10, 10], [4], [30], [1000]]
    assert [t for run in runs for t in run][0] is f32[0]


def test_packed_sum_is_bit_identical_to_one_all_reduce_per_tensor(tmp_path) -> None:
    out = tmp_path / "sums.pt"
    run_ranks(2, packed_sums, str(out))
    result = torch.load(out)
    for packed, single in zip(result["packed"], result["per_tensor"], strict=True):
        assert packed.dtype == single.dtype and torch.equal(packed, single)
    assert result["strides"] == result["made_strides"]  # summed in place, layout kept


def test_two_rank_training_is_bit_identical_with_packed_and_per_tensor_reductions(tmp_path, zsre_train_path) -> None:
    """SMEdit (batch) and RLEdit2 (sequential, KL): same networks and losses to the bit, 2 gloo ranks."""
    out = tmp_path / "runs.pt"
    run_ranks(2, train_packed_and_per_tensor, str(zsre_train_path), str(out))
    runs = torch.load(out)
    for case in ("SMEdit", "RLEdit2"):
        (packed, packed_losses), (single, single_losses) = runs[(case, "packed")], runs[(case, "per_tensor")]
        assert packed_losses == single_losses and len(packed_losses) == 2
        assert packed.keys() == single.keys()
        for name in packed:
            assert torch.equal(packed[name], single[name]), f"{case}: {name} differs"


def test_the_bucket_cap_bounds_the_extra_memory() -> None:
    """Tensors above the cap are reduced alone, in place, without a flat copy."""
    big = torch.zeros(distributed.BUCKET_BYTES // 4 + 1)
    small = [torch.zeros(3), torch.zeros(5)]
    runs = list(buckets([*small, big, *small]))
    assert [len(run) for run in runs] == [2, 1, 2] and runs[1][0] is big
