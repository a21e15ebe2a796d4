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
import dataclasses
import math
import random
import time
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import EditRecord
from ..editing import WeightsSnapshot
from ..precision import RoundingReport, float32_edit_weights, wants_float32
from ..text import build_batch
from .editor import HypernetEditor, hypernet_device
from .hparams import HypernetHyperParams
from .losses import answer_cross_entropy, answer_logits, kl_locality
from .shifts import to_in_out


@dataclasses.dataclass
class TrainState:
    """Progress that a resumed run continues from."""

    optimizer_steps: int = 0
    units_done: int = 0  # training batches (batch mode) or trajectories (sequential mode)
    seconds: float = 0.0
    edits_seen: int = 0
    history: list = dataclasses.field(default_factory=list)


class MetaTrainer:
    """Trains a :class:`HypernetEditor` on a model for one of the hypernetwork methods."""

    def __init__(self, model: nn.Module, tok, hparams: HypernetHyperParams, editor: Optional[HypernetEditor] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[TrainState] = None) -> None:
        self.model = model
        self.tok = tok
        self.hp = hparams
        self.editor = editor if editor is not None else HypernetEditor(model, hparams, device=hypernet_device(hparams))
        self.sequential = hparams.num_seq > 1
        self.opt = optimizer if optimizer is not None else torch.optim.Adam(self.editor.unique_parameters(), lr=hparams.meta_lr)
        self.state = state if state is not None else TrainState()
        self.weights = {n: self.editor.edit_module(n).weight for n in self.editor.module_names}

    # -- data ------------------------------------------------------------------------------
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

    def _mbs(self, prompts: list[str], answers: list[str]) -> list[dict[str, torch.Tensor]]:
        size = self.hp.micro_batch_size
        return [build_batch(self.tok, prompts[i:i + size], answers[i:i + size]) for i in range(0, len(prompts), size)]

    def _edit_mbs(self, batch: Sequence[EditRecord]):
        return self._mbs([r.prompt for r in batch], [r.target_new for r in batch])

    def _equiv_mbs(self, batch: Sequence[EditRecord]):
        return self._mbs([r.rephrase_prompts[0] if r.rephrase_prompts else r.prompt for r in batch],
                         [r.target_new for r in batch])

    def _unrel_mbs(self, batch: Sequence[EditRecord]):
        with_loc = [r for r in batch if r.locality_prompts]
        return self._mbs([r.locality_prompts[0] for r in with_loc], [r.locality_answers[0] for r in with_loc])

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
    def _reference_logits(self, mbs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        return [answer_logits(self.model, mb).float() for mb in mbs]

    def _meta_loss_grads(self, equiv: list[list[dict]], unrel: list[list[dict]], refs: list[list[torch.Tensor]],
                         weights: list[float]) -> tuple[dict[str, torch.Tensor], float]:
        """Weight gradients of sum_j weights[j] * (CE(equiv_j) + loc_coef * KL(unrel_j)), one micro-batch at a time."""
        grads: dict[str, torch.Tensor] = {}
        total = 0.0
        loc_coef = self.hp.locality_coef()
        for w, eq_mbs, un_mbs, ref in zip(weights, equiv, unrel, refs):
            for mb in eq_mbs:
                loss = w * answer_cross_entropy(self.model, mb)
                total += float(loss.detach())
                self._grad_of(loss, grads)
            if loc_coef > 0:
                for mb, ref_logits in zip(un_mbs, ref):
                    loss = w * loc_coef * kl_locality(ref_logits, answer_logits(self.model, mb))
                    total += float(loss.detach())
                    self._grad_of(loss, grads)
        return grads, total

    def _add_shift_penalty(self, grads: dict[str, torch.Tensor], shifts: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """Gradient of ``reg_coef * ||param_shift||^2`` w.r.t. the shift (Eq. 7), added to ``G``."""
        reg = self.hp.shift_penalty_coef()
        if reg == 0:
            return grads
        return {n: grads.get(n, torch.zeros_like(shifts[n])).to(shifts[n].device) + 2.0 * reg * scale * shifts[n]
                for n in shifts}

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
        edit, equiv, unrel = self._edit_mbs(batch), self._equiv_mbs(batch), self._unrel_mbs(batch)
        refs = self._reference_logits(unrel) if self.hp.locality_coef() > 0 else []
        loss = 0.0
        with self._float32_edit_weights(), self._restoring(snap):
            for s in range(self.hp.bp_steps):
                rec = self.editor.bp_step(self.model, edit, s, update_normaliser=True)
                grads, loss = self._meta_loss_grads([equiv], [unrel], [refs], [1.0])
                grads = self._add_shift_penalty(grads, rec.shifts, 1.0)
                self.opt.zero_grad(set_to_none=True)
                self.editor.meta_backward(rec, grads)
                self._optimizer_step()
                if not self.hp.cumulative_steps:
                    snap.restore()
        return loss

    def _train_trajectory(self, records: list[EditRecord]) -> float:
        """Sequential mode: ``num_seq`` batches whose edits accumulate; one Adam step at the end."""
        snap = self._snapshot()
        n = self.hp.n_edits
        batches = [records[i:i + n] for i in range(0, len(records), n)]
        history: list[tuple[list, list]] = []
        total = 0.0
        self.opt.zero_grad(set_to_none=True)
        with self._float32_edit_weights(), self._restoring(snap):
            for i, batch in enumerate(batches):
                history.append((self._equiv_mbs(batch), self._unrel_mbs(batch)))
                weights = self.hp.trajectory_weights(i)
                window = history[::-1][:len(weights)]  # j = 0 is the current batch
                with_kl = self.hp.locality_coef() > 0
                refs = [self._reference_logits(un) if with_kl else [] for _, un in window]
                edit = self._edit_mbs(batch)
                recs = [self.editor.bp_step(self.model, edit, s, update_normaliser=True) for s in range(self.hp.bp_steps)]
                grads, loss = self._meta_loss_grads([w[0] for w in window], [w[1] for w in window], refs, weights)
                total += loss
                scale = self.hp.shift_penalty_scale(i)
                for rec in recs:
                    self.editor.meta_backward(rec, self._add_shift_penalty(grads, rec.shifts, scale))
            self._optimizer_step()
        return total

    # -- the loop --------------------------------------------------------------------------
    def train(self, records: Sequence[EditRecord], *, validate: Optional[Callable[[], dict]] = None,
              checkpoint: Optional[Callable[["MetaTrainer"], None]] = None, progress: bool = True) -> TrainState:
        """Run the remaining units (a resumed trainer skips the ones already done)."""
        units = self._batches(records)
        todo = units[self.state.units_done:]
        flags = {n: w.requires_grad for n, w in self.weights.items()}
        frozen = [p for p in self.model.parameters() if p.requires_grad and all(p is not w for w in self.weights.values())]
        for p in frozen:
            p.requires_grad_(False)
        for w in self.weights.values():
            w.requires_grad_(True)
        bar = tqdm(todo, desc=f"train {self.hp.alg_name}", unit="seq" if self.sequential else "batch", disable=not progress)
        try:
            for unit in bar:
                start = time.perf_counter()
                loss = self._train_trajectory(unit) if self.sequential else self._train_batch(unit)
                self.state.seconds += time.perf_counter() - start
                self.state.units_done += 1
                self.state.edits_seen += len(unit)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._mean_edit_lr():.2e}")
                entry = {"unit": self.state.units_done, "loss": loss, "seconds": self.state.seconds}
                due = self.hp.val_interval and self.state.units_done % self.hp.val_interval == 0
                if due and validate is not None:
                    entry["val"] = validate()
                self.state.history.append(entry)
                if due and checkpoint is not None:
                    checkpoint(self)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for n, w in self.weights.items():
                w.requires_grad_(flags[n])
        return self.state

    def _mean_edit_lr(self) -> float:
        values = [float(net.lr.weight.detach().mean()) for nets in self.editor.nets for net in nets.values()]
        return sum(values) / max(len(values), 1) if values else math.nan
