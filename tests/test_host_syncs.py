"""Host synchronisations of hypernetwork training and editing do not grow with the number of micro-batches.

A GPU run waits for the device whenever the host reads a value (``.item()``, ``float()``, ``bool()``),
whenever a shape depends on data (``nonzero``, a boolean-mask index), on a copy to the host, and on a
blocking copy from the host (PyTorch synchronises the stream after it). With micro-batches of 4 on a
large model each forward is launch-bound, so one such wait per micro-batch (or per module) stalls the
GPU every time. The model runs on the fake GPUs of ``tests/spread_devices.py``, where those events
are visible on a CPU-only machine; :class:`HostSyncs` counts them.
"""
from __future__ import annotations

import collections
import traceback
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smedit_plugin.records import load_records
from smedit_plugin.hypernet.editor import HypernetEditor, edit_batch
from smedit_plugin.hypernet.trainer import MetaTrainer
from smedit_plugin.resolve import hparams_class
from smedit_plugin.testing import tiny_model
from smedit_plugin.tfcompat import transformers_version
from spread_devices import GPUS, OnDevice, fake_gpus, spread

pytestmark = pytest.mark.skipif(transformers_version().major < 5,
                                reason="fake-GPU harness needs transformers >= 5 (4.x rotary autocast rejects meta)")
aten = torch.ops.aten
#: ops whose result the host must wait for when their input is on a GPU
READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._linalg_check_errors, aten.equal,
         aten.unique_consecutive, aten._unique2, aten.bincount}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
SECOND_HALF = ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]


class HostSyncs(TorchDispatchMode):
    """Counts ops that make the host wait for a (fake) GPU, with the plugin line that caused each."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func.overloadpacket, args, kwargs)
        if kind is not None:
            plugin = [f for f in traceback.extract_stack()[:-1] if "smedit_plugin" in f.filename]
            self.where[(kind, f"{plugin[-1].filename.rsplit('/', 1)[-1]}:{plugin[-1].lineno}" if plugin else "?")] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _kind(packet: Any, args: tuple, kwargs: dict) -> Any:
        on_gpu = any(isinstance(t, OnDevice) for t in tree_leaves((args, kwargs)))
        if on_gpu and packet in READS:
            return str(packet)
        if on_gpu and packet in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                                 for i in args[1] or ()):
            return "boolean-mask index"
        device = kwargs.get("device")
        if packet is aten._to_copy and device is not None:
            if isinstance(args[0], OnDevice) and torch.device(device).type == "cpu":
                return "copy to host"
            if not isinstance(args[0], OnDevice) and torch.device(device) in GPUS and args[0].numel() \
                    and not kwargs.get("non_blocking", False):
                return "blocking copy from host"
        return None


def _hparams(alg: str, micro_batch_size: int, **extra: Any):
    return hparams_class(alg)(alg_name=alg, model_name="tiny-llama", edit_modules=MODULES, rank=4,
                                            n_blocks=2, lr=1e-2, meta_lr=1e-3, n_edits=4,
                                            micro_batch_size=micro_batch_size, chunk_size=3, max_steps=1,
                                            val_fraction=0.0, **extra)


def _training_unit_syncs(alg: str, micro_batch_size: int, records, **extra: Any) -> HostSyncs:
    hp = _hparams(alg, micro_batch_size, **extra)
    model, tok = tiny_model("llama3", n_layers=4)
    with fake_gpus():
        spread(model, SECOND_HALF)
        trainer = MetaTrainer(model, tok, hp)
        with HostSyncs() as syncs:
            trainer.train(records[:hp.n_edits * hp.num_seq], progress=False)
    assert trainer.state.units_done == 1
    return syncs


@pytest.fixture(scope="module")
def records(zsre_train_path):
    return load_records(zsre_train_path, "zsre", limit=8)


@pytest.mark.parametrize("alg,extra,per_unit", [
    ("SMEdit", {}, 2 + 2),  # a check per BP step, the unit's loss, the progress bar's mean lr
    ("MALMEN2", {}, 2 + 2),  # with the KL locality term
    ("RLEdit2", {"num_seq": 2, "back_depth": 2}, 2 * 2 + 2),  # a trajectory of 2 batches of 2 BP steps
])
def test_host_syncs_of_a_training_unit_do_not_grow_with_micro_batches(records, alg: str, extra: dict,
                                                                       per_unit: int) -> None:
    counts = {size: _training_unit_syncs(alg, size, records, **extra) for size in (4, 2, 1)}
    report = {size: dict(syncs.where) for size, syncs in counts.items()}
    assert len({syncs.total for syncs in counts.values()}) == 1, f"syncs per unit by micro_batch_size: {report}"
    assert counts[1].total == per_unit, report


def test_host_syncs_of_an_edit_do_not_grow_with_micro_batches(records) -> None:
    totals = {}
    for size in (4, 2, 1):
        hp = _hparams("MALMEN2", size)
        model, tok = tiny_model("llama3", n_layers=4)
        with fake_gpus():
            spread(model, SECOND_HALF)
            editor = HypernetEditor(model, hp, device=GPUS[0])
            with HostSyncs() as syncs:
                edit_batch(model, tok, editor, [r.prompt for r in records[:4]], [r.target_new for r in records[:4]])
        totals[size] = syncs
    report = {size: dict(syncs.where) for size, syncs in totals.items()}
    assert len({syncs.total for syncs in totals.values()}) == 1, report
    assert totals[1].total == hp.bp_steps, report  # one check per BP step
