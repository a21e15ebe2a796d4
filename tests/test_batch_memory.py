"""Rows in chunks within a memory budget (issue 27.4) give the results of the whole-batch path.

The whole-batch path is one chunk with everything in memory (what the plugin did before chunking);
the chunked path reads 16 rows at a time and spills every cached row, reference logit and prefix state
to disk (``cache_memory_mb: 0``). Both edit and train SMEdit, MALMEN2 (locality logits) and RLEdit2
(sequential trajectories) on a tiny SmolLM2-shaped model; the weights and networks agree up to float
summation order.
"""
from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch

from smedit_plugin.hypernet import network as network_module
from smedit_plugin.hypernet.cache import ModuleCache
from smedit_plugin.hypernet.editor import HypernetEditor, edit_batch
from smedit_plugin.hypernet.spill import HostArena, MemoryBudget, SpillFile
from smedit_plugin.hypernet.trainer import MetaTrainer
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.records import load_records
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.smedit.hparams import SMEditHyperParams

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
BASE = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-2, meta_lr=1e-3,
            micro_batch_size=8, max_steps=1)
#: 48 facts give ~150-250 answer rows per module, more than d_in (64, 128): the primal form, many chunks.
METHODS = {
    "SMEdit": (SMEditHyperParams, dict(n_edits=48, bp_steps=2)),
    "MALMEN2": (MALMEN2HyperParams, dict(n_edits=48, bp_steps=2, loc_coef=0.6)),
    "RLEdit2": (RLEdit2HyperParams, dict(n_edits=24, num_seq=2, back_depth=2, loc_coef=0.6)),
}
WHOLE = dict(chunk_size=100_000, cache_memory_mb=None)
CHUNKED = dict(chunk_size=16, cache_memory_mb=0.0)


@pytest.fixture(scope="module")
def tiny4(tiny):
    return tiny("smollm2", n_layers=4)


@pytest.fixture(scope="module")
def records(zsre_train_path):
    return load_records(zsre_train_path, dataset="zsre", limit=48)


class Recorder:
    """Budgets the editor hands out, the largest row range read from a cache and the largest network input."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.budgets: list[MemoryBudget] = []
        self.max_read = 0
        self.max_net_rows = 0
        self.peak_used = 0
        recorder = self
        real_budget, real_rows = HypernetEditor.memory_budget, ModuleCache.rows
        real_reserve, real_forward = MemoryBudget.reserve, network_module.HyperNet.forward

        def memory_budget(editor: HypernetEditor) -> MemoryBudget:
            budget = real_budget(editor)
            recorder.budgets.append(budget)
            return budget

        def rows(cache: ModuleCache, start: int, stop: int):
            recorder.max_read = max(recorder.max_read, stop - start)
            return real_rows(cache, start, stop)

        def reserve(budget: MemoryBudget, nbytes: int) -> bool:
            ok = real_reserve(budget, nbytes)
            recorder.peak_used = max(recorder.peak_used, budget.used)
            return ok

        def forward(net, keys, value_grads, module_idx):
            recorder.max_net_rows = max(recorder.max_net_rows, keys.shape[0])
            return real_forward(net, keys, value_grads, module_idx)

        monkeypatch.setattr(HypernetEditor, "memory_budget", memory_budget)
        monkeypatch.setattr(ModuleCache, "rows", rows)
        monkeypatch.setattr(MemoryBudget, "reserve", reserve)
        monkeypatch.setattr(network_module.HyperNet, "forward", forward)


def _hparams(method: str, **storage: Any):
    cls, extra = METHODS[method]
    return cls(**BASE, alg_name=method, **extra, **storage)


def _perturb(editor: HypernetEditor) -> None:
    """Non-zero B blocks and normaliser statistics, so the network is more than the identity (seeded: every
    run gets the same)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    for nets in editor.nets:
        for net in nets.values():
            net.update_normaliser(torch.randn(50, net.key_size, generator=gen) + 0.5,
                                  2 * torch.randn(50, net.value_size, generator=gen))


def _edit(tiny4, records, method: str, storage: dict) -> tuple[dict, dict]:
    """The edited weights before and after one batch edit."""
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    hp = _hparams(method, **storage)
    torch.manual_seed(0)
    editor = HypernetEditor(model, hp, device=torch.device("cpu"))
    _perturb(editor)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in MODULES}
    facts = records[:hp.n_edits]
    edit_batch(model, tok, editor, [r.prompt for r in facts], [r.target_new for r in facts])
    return before, {name: model.get_submodule(name).weight.detach().clone() for name in MODULES}


def _train(tiny4, records, method: str, storage: dict) -> tuple[dict, dict]:
    """One training unit: the hypernetwork gradient of every Adam step (from zero) and the normaliser
    statistics (before and after). Gradients, not the updated parameters, because Adam's first steps are
    ``meta_lr * g / (|g| + eps)``: a near-zero entry of ``g`` turns a rounding difference into a full step."""
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    hp = _hparams(method, **storage)
    torch.manual_seed(0)
    trainer = MetaTrainer(model, tok, hp)
    _perturb(trainer.editor)
    params = trainer.editor.unique_parameters()
    grads: list[torch.Tensor] = []
    trainer.opt.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(p.grad.clone() for p in params))
    buffers = {k: v.clone() for k, v in trainer.editor.state_dict().items() if "normaliser" in k}
    trainer.train(records[:hp.n_edits * hp.num_seq], progress=False)
    after = {k: v.clone() for k, v in trainer.editor.state_dict().items() if "normaliser" in k}
    after.update({f"grad {i}": g for i, g in enumerate(grads)})
    return {**buffers, **{f"grad {i}": torch.zeros_like(g) for i, g in enumerate(grads)}}, after


def assert_same_change(before: dict, expected: dict, actual: dict, rel: float) -> None:
    """Every tensor moved as in ``expected`` up to ``rel`` of its largest change (0: bit for bit)."""
    assert any(not torch.equal(expected[k], before[k]) for k in before)  # something moved
    for k in before:
        if torch.equal(expected[k], before[k]):  # e.g. the embeddings of modules a network does not serve
            assert torch.equal(actual[k], before[k]), k
            continue
        scale = float((expected[k].double() - before[k].double()).abs().max())
        diff = float((actual[k].double() - expected[k].double()).abs().max())
        assert diff <= rel * scale, f"{k}: off by {diff:.3g}, moved by {scale:.3g}"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("run", [_edit, _train], ids=["edit", "train"])
def test_chunked_and_spilled_rows_give_the_whole_batch_result(tiny4, records, monkeypatch, method, run) -> None:
    before, whole = run(tiny4, records, method, WHOLE)
    recorder = Recorder(monkeypatch)
    _, spilled = run(tiny4, records, method, dict(WHOLE, cache_memory_mb=0.0))
    assert recorder.budgets and all(b.spilled > 0 and b.used == 0 for b in recorder.budgets)
    assert_same_change(before, whole, spilled, 0.0)  # spilling copies bytes: bit for bit
    recorder.max_net_rows = 0
    _, chunked = run(tiny4, records, method, CHUNKED)
    assert 0 < recorder.max_net_rows <= CHUNKED["chunk_size"]
    assert_same_change(before, whole, chunked, 1e-4)  # chunk sums: float summation order only


def test_a_small_chunk_and_budget_bound_what_cached_rows_hold(tiny4, records, monkeypatch) -> None:
    """A batch whose rows take ~8x the budget: memory holds at most the budget, reads are chunk-sized,
    the primal solver holds no keys, and the shift equals the one computed with every row in memory."""
    monkeypatch.setattr(network_module, "NORMALISER_ROWS", 8)
    model, tok = copy.deepcopy(tiny4[0]), tiny4[1]
    hp = _hparams("MALMEN2", cache_memory_mb=0.05, chunk_size=8)  # 52 kB; a row is 768 B
    editor = HypernetEditor(model, hp, device=torch.device("cpu"))
    _perturb(editor)
    facts = records[:hp.n_edits]
    batches = editor.edit_micro_batches(tok, [r.prompt for r in facts], [r.target_new for r in facts])
    reference = copy.deepcopy(editor)
    recorder = Recorder(monkeypatch)
    budget = MemoryBudget(hp.cache_memory_mb)
    record = editor.bp_step(model, batches, 0, update_normaliser=True, budget=budget)
    total = sum(c.n_rows * c.width * 4 for c in record.caches.values())
    assert total > 5 * budget.limit
    assert 0 < recorder.peak_used <= budget.limit and budget.spilled > 0
    assert all(c.spilled_rows > 0 for c in record.caches.values())
    assert recorder.max_read <= 8 and recorder.max_net_rows <= 8
    assert all(s.form == "primal" and s.keys is None for s in record.solvers.values())
    rows = {name: ModuleCache.of(*cache.rows(0, cache.n_rows)) for name, cache in record.caches.items()}
    record.release()
    assert budget.used == 0 and record.caches == {}
    # the same rows, all in memory, through the same network state before the step
    from smedit_plugin.hypernet.network import update_normalisers
    from smedit_plugin.hypernet.shifts import predict_param_shift

    update_normalisers([reference.net_for(0, pos).normaliser_update(rows[name])
                        for pos, name in enumerate(MODULES)])
    for pos, name in enumerate(MODULES):
        shift, _ = predict_param_shift(reference.net_for(0, pos), reference.module_idx[pos], rows[name],
                                       chunk_size=100_000)
        assert float((record.shifts[name] - shift).abs().max()) <= 1e-4 * float(shift.abs().max()), name


def test_cache_reads_back_exactly_what_was_appended_across_memory_and_file(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = [(torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)) for n in (4, 7, 1, 6, 5)]
    budget = MemoryBudget(11 * 8 * 4 / 2 ** 20, str(tmp_path))  # room for the first two blocks only
    cache = ModuleCache(budget)
    for keys, grads in blocks:
        cache.append(keys, grads)
    assert cache.spilled_rows == 12 and cache.n_rows == 23 and budget.used == 11 * 8 * 4
    keys, grads = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    assert torch.equal(cache.keys, keys) and torch.equal(cache.value_grads, grads)
    for size in (1, 3, 10, 100):
        chunks = list(cache.chunks(size))
        assert all(c[0].shape[0] <= size for c in chunks)
        assert torch.equal(torch.cat([c[0] for c in chunks]), keys)
        assert torch.equal(torch.cat([c[1] for c in chunks]), grads)
    for (k, g), (ek, eg) in zip(cache.micro_batches(), blocks):
        assert torch.equal(k, ek) and torch.equal(g, eg)
    assert list(tmp_path.iterdir()) == []  # anonymous files: nothing left to clean up
    cache.release()
    assert budget.used == 0 and cache.n_rows == 0
    with pytest.raises(ValueError, match="empty"):
        cache.keys


def test_kept_rows_share_a_few_slabs_and_a_released_cache_frees_its_own() -> None:
    """Rows kept in memory are copies packed into the cache's own slabs (no thousands of small heap blocks), with
    their values, dtypes and any alignment; a slab lives while any of its views does, never longer."""
    gen = torch.Generator().manual_seed(5)
    caches = [ModuleCache(), ModuleCache()]
    blocks = [(torch.randn(3, 5, generator=gen), torch.randn(3, 7, generator=gen)) for _ in range(200)]
    for keys, grads in blocks:
        for cache in caches:
            cache.append(keys, grads)
    storages = {id(t.untyped_storage()) for b in caches[0]._blocks for t in b}
    ptrs = {t.untyped_storage().data_ptr() for b in caches[0]._blocks for t in b}
    assert len(ptrs) == 1 and len(storages) >= 1  # 200 micro-batches, one slab
    other = {t.untyped_storage().data_ptr() for b in caches[1]._blocks for t in b}
    assert other.isdisjoint(ptrs)  # each cache has its own slabs
    assert all(k.data_ptr() != b[0].data_ptr() for (k, _), b in zip(caches[1]._blocks, blocks))  # copies
    slabs = [weakref.ref(cache._arena._slab) for cache in caches]
    caches[0].release()
    gc.collect()
    assert slabs[0]() is None and slabs[1]() is not None  # freed with its cache, the other cache's slab untouched
    assert torch.equal(caches[1].keys, torch.cat([b[0] for b in blocks]))
    assert torch.equal(caches[1].value_grads, torch.cat([b[1] for b in blocks]))
    gc.collect()
    assert slabs[1]() is None  # the merged rows replaced the slab; the arena does not keep it alive

    arena = HostArena(slab_bytes=256)
    mixed = [torch.arange(3, dtype=torch.uint8), torch.randn(4, dtype=torch.float64), torch.randn(2, 3).bfloat16(),
             torch.arange(5, dtype=torch.int64), torch.randn(100, dtype=torch.float32)]  # the last needs its own slab (400 bytes, 448 aligned)
    kept = [arena.keep(t) for t in mixed]
    for t, k in zip(mixed, kept):
        assert k.dtype == t.dtype and k.shape == t.shape and torch.equal(k, t) and k.data_ptr() % t.element_size() == 0
    assert len({k.untyped_storage().data_ptr() for k in kept[:4]}) == 1
    assert kept[4].untyped_storage().nbytes() == 448 and kept[4].untyped_storage().data_ptr() != kept[0].untyped_storage().data_ptr()
    meta = torch.empty(4, device="meta")
    assert arena.keep(meta) is meta  # other devices keep their own allocators


def test_spill_file_round_trips_any_dtype() -> None:
    spill = SpillFile()
    tensors = [torch.randn(3, 4), torch.arange(6, dtype=torch.int64).reshape(2, 3),
               torch.randn(5).to(torch.bfloat16), torch.randn(2, 2, dtype=torch.float64)]
    offsets = [spill.write(t) for t in tensors]
    for t, offset in zip(tensors, offsets):
        assert torch.equal(spill.read(offset, tuple(t.shape), t.dtype), t)
    spill.close()


def test_a_negative_budget_is_refused_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="cache_memory_mb"):
        MemoryBudget(-1.0)
    with pytest.raises(Exception, match="cache_memory_mb"):
        _hparams("SMEdit", cache_memory_mb=-5.0)


def test_storage_fields_are_not_part_of_an_archives_cache_key() -> None:
    from smedit_plugin.hypernet.training import archive_fingerprint

    hp = _hparams("SMEdit")
    key = archive_fingerprint(hp, "tiny", "zsre", "records")
    assert archive_fingerprint(hp.replace(cache_memory_mb=1.0, spill_dir="/tmp"), "tiny", "zsre", "records") == key
    assert archive_fingerprint(hp.replace(lr=0.5), "tiny", "zsre", "records") != key

