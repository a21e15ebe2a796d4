"""The one meta-trainer behind MALMEN1/2, SMEdit (batch and sequential) and RLEdit1/2.

Batch mode (``num_seq == 1``): for each training batch, ``bp_steps`` cumulative BP steps; after each
step the meta-loss gradient reaches the (shared) network through the least-squares solve and Adam
steps at once (step-wise updating). Sequential mode: a trajectory of ``num_seq`` batches whose edits
accumulate; gradients are summed over the trajectory and Adam steps once per trajectory.

The LLM and the hypernetwork are never differentiated in one graph: the meta-loss only produces
weight gradients ``G``, which :meth:`HypernetEditor.meta_backward` pushes through the solve.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import operator
import random
import time
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..records import EditRecord
from ..editing import WeightsSnapshot
from ..precision import RoundingReport, float32_edit_weights, wants_float32
from ..text import build_batch
from .editor import HypernetEditor, edit_batch, hypernet_device
from .hparams import HypernetHyperParams
from ..answers import answer_logits
from .losses import answer_cross_entropy, kl_locality
from ..distributed import SINGLE, RowReduce
from .prefix import FrozenPrefix, forward_context
from .shifts import module_shape, to_in_out
from .spill import SpillPool, Stored


@dataclasses.dataclass
class TrainState:
    """Progress that a resumed run continues from."""

    optimizer_steps: int = 0
    units_done: int = 0  # training batches (batch mode) or trajectories (sequential mode)
    seconds: float = 0.0
    edits_seen: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_val_loss: Optional[float] = None  # lowest validation loss so far (the archive on disk holds those networks)
    best_unit: int = 0
    stale_validations: int = 0  # validations since the best one (early stopping counts these)
    stopped_early: bool = False


class MetaTrainer:
    """Trains a :class:`HypernetEditor` on a model for one of the hypernetwork methods."""

    def __init__(self, model: nn.Module, tok, hparams: HypernetHyperParams, editor: Optional[HypernetEditor] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[TrainState] = None,
                 reduce: RowReduce = SINGLE) -> None:
        self.model = model
        #: the data-parallel ranks this trainer shares each batch with (:mod:`.distributed`); one process: SINGLE
        self.reduce = reduce
        self.tok = tok
        self.hp = hparams
        self.editor = editor if editor is not None else HypernetEditor(model, hparams, device=hypernet_device(hparams))
        self.sequential = hparams.num_seq > 1
        self.opt = optimizer if optimizer is not None else torch.optim.Adam(self.editor.unique_parameters(), lr=hparams.meta_lr)
        self.state = state if state is not None else TrainState()
        self.weights = {n: self.editor.edit_module(n).weight for n in self.editor.module_names}
        #: reuse locality logits across the batches of a trajectory (exact; tests compare against False)
        self.reuse_reference_logits = True
        # 1 / ||W||^2 of each edited weight (training units always start from these weights)
        self._penalty_norm = {n: (1.0 / float(w.detach().float().pow(2).sum()) if hparams.shift_penalty_norm == "relative"
                                  else 1.0) for n, w in self.weights.items()}

    # -- data ------------------------------------------------------------------------------
    def units_per_epoch(self, n_records: int) -> int:
        """Training units in one pass over ``n_records`` records (a remainder smaller than a unit is left out)."""
        return n_records // (self.hp.n_edits * self.hp.num_seq)

    def _batches(self, records: Sequence[EditRecord]) -> list[list[EditRecord]]:
        """Shuffled (seeded) units: batches of ``n_edits`` or trajectories of ``num_seq`` such batches."""
        per_unit = self.hp.n_edits * self.hp.num_seq
        units: list[list[EditRecord]] = []
        for epoch in range(self.hp.n_epochs):
            order = list(records)
            random.Random(self.hp.seed + epoch).shuffle(order)
            units += [order[i:i + per_unit] for i in range(0, len(order) - per_unit + 1, per_unit)]
        if not units:
            raise ValueError(f"training needs at least n_edits * num_seq = {per_unit} records, got {len(records)}; "
                             "lower n_edits/num_seq or add records")
        if self.hp.max_steps > 0:
            units = units[: self.hp.max_steps]
        return units

    def _mbs(self, prompts: list[str], answers: list[str], shard: bool) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of ``micro_batch_size``; with ``shard``, only this rank's share of them."""
        size = self.hp.micro_batch_size
        indices = range(0, len(prompts), size)
        if shard:
            indices = self.reduce.shard(indices)
        return [build_batch(self.tok, prompts[i:i + size], answers[i:i + size]) for i in indices]

    def _edit_mbs(self, batch: Sequence[EditRecord], shard: bool = True):
        if shard:
            self.reduce.check_shardable(-(-len(batch) // self.hp.micro_batch_size), f"{self.hp.alg_name} training batch")
        return self._mbs([r.prompt for r in batch], [r.target_new for r in batch], shard)

    def _equiv_mbs(self, batch: Sequence[EditRecord], shard: bool = True):
        return self._mbs([r.rephrase_prompts[0] if r.rephrase_prompts else r.prompt for r in batch],
                         [r.target_new for r in batch], shard)

    def _unrel_mbs(self, batch: Sequence[EditRecord], shard: bool = True):
        with_loc = [r for r in batch if r.locality_prompts]
        return self._mbs([r.locality_prompts[0] for r in with_loc], [r.locality_answers[0] for r in with_loc], shard)

    # -- losses ----------------------------------------------------------------------------
    def _grad_of(self, loss: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        """Add d loss / d W (in, out orientation, fp32) of every edited weight into ``grads``."""
        names = self.editor.module_names
        parts = torch.autograd.grad(loss, [self.weights[n] for n in names], allow_unused=True)
        for name, g in zip(names, parts):
            if g is not None:
                g = to_in_out(self.editor.edit_module(name), g.float())
                grads[name] = grads[name] + g if name in grads else g

    @torch.no_grad()
    def _reference_logits(self, mbs: list[dict[str, torch.Tensor]], prefix: Optional[FrozenPrefix], pool: SpillPool,
                          known: Optional[dict[int, Stored]] = None) -> list[Stored]:
        """Logits of ``mbs`` at the current weights, kept in ``pool``'s budget; ``known`` holds some already
        (by micro-batch identity)."""
        refs = []
        for mb in mbs:
            if known is not None and id(mb) in known:
                refs.append(known[id(mb)])
                continue
            with forward_context(prefix, mb):
                refs.append(pool.store(answer_logits(self.model, mb).float()))
        return refs

    def _meta_loss_grads(self, equiv: list[list[dict]], unrel: list[list[dict]], refs: list[list[Stored]],
                         weights: list[float], prefix: Optional[FrozenPrefix],
                         seen: Optional[tuple[SpillPool, dict[int, Stored]]] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Weight gradients of sum_j weights[j] * (CE(equiv_j) + loc_coef * KL(unrel_j)), one micro-batch at a time.

        The meta-loss comes back as a float64 tensor on the device, summed there (the caller reads it once
        per unit). ``seen`` = ``(pool, logits)``: ``logits`` receives the (detached) logits of every locality
        micro-batch, kept in ``pool`` and keyed by the micro-batch's identity.
        """
        grads: dict[str, torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        loc_coef = self.hp.locality_coef()
        for w, eq_mbs, un_mbs, ref in zip(weights, equiv, unrel, refs):
            for mb in eq_mbs:
                with forward_context(prefix, mb):
                    loss = w * answer_cross_entropy(self.model, mb)
                losses.append(loss.detach())
                self._grad_of(loss, grads)
            if loc_coef > 0:
                for mb, ref_logits in zip(un_mbs, ref):
                    with forward_context(prefix, mb):
                        logits = answer_logits(self.model, mb)
                    if seen is not None:
                        seen[1][id(mb)] = seen[0].store(logits.detach().float())
                    loss = w * loc_coef * kl_locality(ref_logits.get(), logits)
                    losses.append(loss.detach())
                    self._grad_of(loss, grads)
        total = device_sum(losses)  # every rank scores at least one micro-batch (check_shardable)
        if not self.reduce.active:
            return grads, total
        # every rank scored its share of the micro-batches: the meta-loss and its G are sums over ranks
        for n in self.editor.module_names:
            if n not in grads:
                grads[n] = torch.zeros(module_shape(self.editor.edit_module(n)), device=self.weights[n].device)
        self.reduce.sum_([grads[n] for n in self.editor.module_names] + [total])
        return grads, total

    def _add_shift_penalty(self, grads: dict[str, torch.Tensor], shifts: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """Gradient of ``reg_coef * ||param_shift||^2`` (Eq. 7; over ``||W||^2`` when relative) w.r.t. the shift, added to ``G``."""
        reg = self.hp.shift_penalty_coef()
        if reg == 0:
            return grads
        return {n: grads.get(n, torch.zeros_like(shifts[n])).to(shifts[n].device)
                + 2.0 * reg * scale * self._penalty_norm[n] * shifts[n] for n in shifts}

    # -- one unit --------------------------------------------------------------------------
    def _snapshot(self) -> WeightsSnapshot:
        """The edited weights before a training unit, which never keeps its edits."""
        snapshot = WeightsSnapshot(self.model)
        for name in self.editor.module_names:
            snapshot.capture_module(name)
        return snapshot

    def adam_updates_per_step(self) -> int:
        """1, or ``bp_steps`` when emulating the reference's shared network listed once per BP step in Adam."""
        return self.hp.bp_steps if self.hp.reference_adam_duplicates and self.editor.shared else 1

    def _optimizer_step(self) -> None:
        if self.reduce.active:  # each rank back-propagated its own rows: the gradient is the sum over ranks
            params = self.editor.unique_parameters()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.reduce.sum_([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(self.editor.unique_parameters(), self.hp.max_grad_norm)
        # Adam with a parameter listed k times updates it k times in a row with the same gradient
        # (the for-loop implementation; spec §1.6): k calls of step() reproduce that exactly.
        for _ in range(self.adam_updates_per_step()):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1

    def _float32_edit_weights(self) -> ContextManager[RoundingReport]:
        """Edit modules in float32 while a unit trains (bf16/fp16 models, ``fp32_edit_weights``), so the
        meta-gradient is taken at the weights plus the unrounded shifts the norm penalty sees."""
        modules = {name: self.editor.edit_module(name) for name in self.editor.module_names}
        return float32_edit_weights(modules, wants_float32(modules, self.hp.fp32_edit_weights))

    @staticmethod
    @contextlib.contextmanager
    def _restoring(snap: WeightsSnapshot) -> Iterator[None]:
        """The unit's edits undone on the way out, whether it finished or failed."""
        try:
            yield
        finally:
            snap.restore()

    def _train_batch(self, batch: list[EditRecord]) -> float:
        """Batch mode: ``bp_steps`` stacked steps, an Adam step after each (step-wise updating)."""
        snap = self._snapshot()
        budget = self.editor.memory_budget()
        prefix = self.editor.frozen_prefix(self.model, budget)
        edit, equiv, unrel = self._edit_mbs(batch), self._equiv_mbs(batch), self._unrel_mbs(batch)
        refs = self._reference_logits(unrel, prefix, SpillPool(budget)) if self.hp.locality_coef() > 0 else []
        loss = None
        with self._float32_edit_weights(), self._restoring(snap):
            for s in range(self.hp.bp_steps):
                rec = self.editor.bp_step(self.model, edit, s, update_normaliser=True, prefix=prefix,
                                          reduce=self.reduce, budget=budget)
                grads, loss = self._meta_loss_grads([equiv], [unrel], [refs], [1.0], prefix)
                grads = self._add_shift_penalty(grads, rec.shifts, 1.0)
                self.opt.zero_grad(set_to_none=True)
                self.editor.meta_backward(rec, grads)
                rec.release()  # so the next step's cached rows do not sit next to these
                del rec, grads
                self._optimizer_step()
                if not self.hp.cumulative_steps:
                    snap.restore()
        return float(loss)

    def _train_trajectory(self, records: list[EditRecord]) -> float:
        """Sequential mode: ``num_seq`` batches whose edits accumulate; one Adam step at the end."""
        snap = self._snapshot()
        budget = self.editor.memory_budget()
        pool = SpillPool(budget)
        prefix = self.editor.frozen_prefix(self.model, budget)
        n = self.hp.n_edits
        batches = [records[i:i + n] for i in range(0, len(records), n)]
        history: list[tuple[list, list]] = []
        # Locality logits the last meta-loss pass computed; its weights are the next batch's pre-edit weights,
        # so they are that batch's reference logits for the earlier batches of its window (no second forward).
        at_current: dict[int, Stored] = {}
        losses: list[torch.Tensor] = []
        self.opt.zero_grad(set_to_none=True)
        with self._float32_edit_weights(), self._restoring(snap):
            for i, batch in enumerate(batches):
                history.append((self._equiv_mbs(batch), self._unrel_mbs(batch)))
                weights = self.hp.trajectory_weights(i)
                window = history[::-1][:len(weights)]  # j = 0 is the current batch
                with_kl = self.hp.locality_coef() > 0
                refs = [self._reference_logits(un, prefix, pool, at_current) if with_kl else [] for _, un in window]
                edit = self._edit_mbs(batch)
                recs = [self.editor.bp_step(self.model, edit, s, update_normaliser=True, prefix=prefix,
                                            reduce=self.reduce, budget=budget) for s in range(self.hp.bp_steps)]
                previous, at_current = at_current, {}
                grads, loss = self._meta_loss_grads([w[0] for w in window], [w[1] for w in window], refs, weights,
                                                    prefix, (pool, at_current) if self.reuse_reference_logits else None)
                for ref in itertools.chain(previous.values(), *refs):  # their budget goes to the next batch's
                    ref.release()
                losses.append(loss)
                scale = self.hp.shift_penalty_scale(i)
                for rec in recs:
                    self.editor.meta_backward(rec, self._add_shift_penalty(grads, rec.shifts, scale))
                    rec.release()
            self._optimizer_step()
        return float(device_sum(losses))

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, records: Sequence[EditRecord]) -> float:
        """The meta-loss of edits the current networks make on held-out ``records``, without the shift penalty.

        Records are cut (in order) into units as in training: a batch of ``n_edits``, or ``num_seq`` such
        batches whose edits accumulate (fewer records than one unit make one shorter unit). Each unit is edited through the edit-time road (normaliser frozen),
        scored by the rephrase cross-entropy of all its facts (plus ``locality_coef`` x KL to the unedited
        model on their locality prompts), and rolled back. Returns the mean over units.
        """
        per_unit = self.hp.n_edits * self.hp.num_seq
        units = [records[i:i + per_unit] for i in range(0, len(records) - per_unit + 1, per_unit)] or [list(records)]
        if not records:
            raise ValueError("validation needs at least one record; give --val-data or a larger val_fraction")
        loc_coef = self.hp.locality_coef()
        losses = []
        for unit in units:
            equiv, unrel = self._equiv_mbs(unit, shard=False), self._unrel_mbs(unit, shard=False)
            refs = self._reference_logits(unrel, None, SpillPool(self.editor.memory_budget())) if loc_coef > 0 else []
            snapshot = None
            try:
                for i in range(0, len(unit), self.hp.n_edits):
                    batch = unit[i:i + self.hp.n_edits]
                    snapshot = edit_batch(self.model, self.tok, self.editor, [r.prompt for r in batch],
                                          [r.target_new for r in batch], snapshot)
                # summed on the device in float64, read once per unit
                loss = float(device_sum([answer_cross_entropy(self.model, mb) for mb in equiv])) / len(equiv)
                if loc_coef > 0 and unrel:
                    kl = float(device_sum([kl_locality(ref.get(), answer_logits(self.model, mb))
                                           for mb, ref in zip(unrel, refs)]))
                    loss += loc_coef * kl / len(unrel)
            finally:
                if snapshot is not None:
                    snapshot.restore()
            losses.append(loss)
        return sum(losses) / len(losses)

    def _record_validation(self, val: dict) -> bool:
        """Update the best/early-stopping state from a validation result; True when it is the best so far."""
        loss = val.get("loss")
        if loss is None or not math.isfinite(loss):
            return False
        if self.state.best_val_loss is None or loss < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_unit, self.state.stale_validations = loss, self.state.units_done, 0
            return True
        self.state.stale_validations += 1
        return False

    # -- the loop --------------------------------------------------------------------------
    def train(self, records: Sequence[EditRecord], *, validate: Optional[Callable[[], dict]] = None,
              checkpoint: Optional[Callable[["MetaTrainer"], None]] = None, progress: bool = True) -> TrainState:
        """Run the remaining units (a resumed trainer skips the ones already done).

        With ``validate`` (returning a dict with ``loss``), validation runs after every epoch (and every
        ``val_interval`` units); ``checkpoint`` is called only when the validation loss improves, so the
        archive on disk always holds the best networks so far, and training stops early after
        ``early_stop_patience`` validations without improvement. On return the editor holds the best
        networks. Without ``validate``, ``checkpoint`` runs every ``val_interval`` units and the editor
        keeps the last networks.
        """
        units = self._batches(records)
        per_epoch = self.units_per_epoch(len(records))
        todo = units[self.state.units_done:]
        best_nets = copy.deepcopy(self.editor.nets.state_dict()) if validate is not None else None
        flags = {n: w.requires_grad for n, w in self.weights.items()}
        frozen = [p for p in self.model.parameters() if p.requires_grad and all(p is not w for w in self.weights.values())]
        for p in frozen:
            p.requires_grad_(False)
        for w in self.weights.values():
            w.requires_grad_(True)
        bar = tqdm(todo, desc=f"train {self.hp.alg_name}", unit="seq" if self.sequential else "batch", disable=not progress or not self.reduce.is_first)
        try:
            for unit in bar:
                start = time.perf_counter()
                loss = self._train_trajectory(unit) if self.sequential else self._train_batch(unit)
                self.state.seconds += time.perf_counter() - start
                self.state.units_done += 1
                self.state.edits_seen += len(unit)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._mean_edit_lr():.2e}")
                done = self.state.units_done
                entry = {"unit": done, "epoch": done / per_epoch, "loss": loss, "seconds": self.state.seconds}
                interval = bool(self.hp.val_interval) and done % self.hp.val_interval == 0
                if validate is None:
                    self.state.history.append(entry)
                    if interval and checkpoint is not None:
                        checkpoint(self)
                    continue
                if not (interval or done % per_epoch == 0 or done == len(units)):
                    self.state.history.append(entry)
                    continue
                entry["val"] = validate()
                self.state.history.append(entry)
                if self.reduce.is_first:
                    bar.write(f"{self.hp.alg_name} unit {done} (epoch {done / per_epoch:.2f}): train loss {loss:.4f}, "
                              + ", ".join(f"val {k} {v:.4f}" for k, v in entry["val"].items()))
                if self._record_validation(entry["val"]):
                    best_nets = copy.deepcopy(self.editor.nets.state_dict())
                    if checkpoint is not None:
                        checkpoint(self)
                elif self.hp.early_stop_patience and self.state.stale_validations >= self.hp.early_stop_patience:
                    self.state.stopped_early = True
                    break
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for n, w in self.weights.items():
                w.requires_grad_(flags[n])
        if best_nets is not None and self.state.best_val_loss is not None:
            self.editor.nets.load_state_dict(best_nets)
        return self.state

    def _mean_edit_lr(self) -> float:
        """Mean over networks of each network's mean edit step size (one read from the device)."""
        values = [net.lr.weight.detach().mean().to(self.editor.device) for nets in self.editor.nets for net in nets.values()]
        return float(torch.stack(values).mean()) if values else math.nan


def device_sum(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``values[0] + values[1] + ...`` in float64 on the device, in order: the sum of their Python floats,
    bit for bit, with no host read per value (the caller reads the total once)."""
    return functools.reduce(operator.add, (value.detach().double() for value in values))
