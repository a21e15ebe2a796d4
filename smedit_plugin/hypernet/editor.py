"""The hypernetwork editor: step networks bound to a model's edit modules.

Shared by training and editing of every hypernetwork method. One BP step (MSBP step ``s``) is:
cache keys and value gradients of the edit tuples at the current weights, predict each module's
``param_shift`` with step ``s``'s network, add it in place. ``bp_steps`` such steps stack.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..devices import resolve_device
from ..editing import WeightsSnapshot, edit_transaction
from ..request_checks import check_lengths, check_targets, warn_contradictions
from ..edit_modules import resolve_edit_modules
from ..errors import OVERFLOW_CAUSE, require_finite
from ..precision import RoundingReport, float32_edit_weights, note_rounding, wants_float32
from ..text import build_batch
from .cache import ModuleCache, cache_keys_and_value_grads
from ..distributed import SINGLE, RowReduce
from .hparams import HypernetHyperParams
from .network import HyperNet, build_hypernets, shape_key, update_normalisers
from .prefix import FrozenPrefix
from .shifts import accumulate_meta_grad, add_param_shift_, module_shape, predict_param_shift, shifted_weight
from .solve import RidgeSolve
from .spill import MemoryBudget

#: Likely causes of a NaN/inf ``param_shift``, named in the error.
SHIFT_CAUSE = ("the edit step size (the network's learned `lr`, initialised by hparams `lr`) is too large, the archive "
               "is from a training run that diverged, or the model's gradients overflowed in float16 "
               "(load it in float32 or bfloat16)")
#: What to do when rounding the edited weights loses a large part of an update (logged with it).
ROUNDING_FIX = ("Train with a larger initial edit step size (`lr` in the TRAINING YAML; the archive's learned step "
                "size follows it) so the updates stand above the rounding, or edit float32 weights (`model_dtype: "
                "float32`)")
#: Entries of the model's identity probe (:func:`identity_probe`).
PROBE_SIZE = 64


def identity_probe(model: nn.Module, edit_modules: Sequence[str]) -> list[float]:
    """``PROBE_SIZE`` entries, at fixed positions, of the model's first parameter that no edit touches.

    For a transformers model that is the token embedding. It identifies the model an archive was
    trained on; the edit modules themselves cannot, since edits that accumulate in them are legitimate.
    """
    edited = {f"{name}.weight" for name in edit_modules}
    param = next((p for n, p in model.named_parameters() if n not in edited), None)
    if param is None:
        return []
    flat = param.detach().reshape(-1)
    positions = torch.randint(flat.numel(), (PROBE_SIZE,), generator=torch.Generator().manual_seed(0))
    return flat[positions.to(flat.device)].float().cpu().tolist()


def hypernet_device(hparams: HypernetHyperParams) -> Optional[torch.device]:
    """``hparams.hypernet_device`` resolved, or None for "the model's device" (training and editing alike)."""
    return resolve_device(hparams.hypernet_device) if hparams.hypernet_device is not None else None


@dataclasses.dataclass
class StepRecord:
    """What one BP step produced, kept until its meta-gradient has been accumulated."""

    step: int
    caches: dict[str, ModuleCache]
    shifts: dict[str, torch.Tensor]
    solvers: dict[str, RidgeSolve]
    reduce: RowReduce = SINGLE  # the ranks whose rows the shifts were solved from

    def release(self) -> None:
        """Drop the cached rows and solvers (their memory budget goes to the next step); the shifts stay."""
        for cache in self.caches.values():
            cache.release()
        self.caches, self.solvers = {}, {}


class HypernetEditor(nn.Module):
    """Holds ``bp_steps`` step networks (one object repeated when shared) for a model's edit modules."""

    def __init__(self, model: nn.Module, hparams: HypernetHyperParams, *, num_seq: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.hparams = hparams
        self.num_seq = hparams.num_seq if num_seq is None else num_seq
        self.module_names = list(hparams.edit_modules)
        pairs = resolve_edit_modules(model, self.module_names)
        self._modules_ref = dict(pairs)
        self.shapes = [module_shape(m) for _, m in pairs]
        self.shared = hparams.shared_hypernet_for(self.num_seq)
        ranks = hparams.step_ranks(self.num_seq)
        self.device = device if device is not None else next(model.parameters()).device
        if self.shared:
            nets, idx = build_hypernets(self.shapes, ranks[0], hparams.n_blocks, hparams.lr)
            self.nets = nn.ModuleList([nets])
        else:
            built = [build_hypernets(self.shapes, r, hparams.n_blocks, hparams.lr) for r in ranks]
            idx = built[0][1]
            self.nets = nn.ModuleList([b[0] for b in built])
        self.module_idx = idx
        self.identity = identity_probe(model, self.module_names)
        self.to(self.device)

    # -- structure ------------------------------------------------------------------------
    def net_for(self, step: int, module_pos: int) -> HyperNet:
        nets = self.nets[0] if self.shared else self.nets[step]
        return nets[shape_key(self.shapes[module_pos])]

    def edit_module(self, name: str) -> nn.Module:
        return self._modules_ref[name]

    def bind(self, model: nn.Module) -> None:
        """Point at the same-named modules of ``model`` (e.g. after the caller deep-copied it)."""
        self._modules_ref = dict(resolve_edit_modules(model, self.module_names))

    def describe(self) -> dict:
        """JSON-able structure used to check an archive against a model."""
        return {
            "edit_modules": self.module_names,
            "shapes": [list(s) for s in self.shapes],
            "shared": self.shared,
            "ranks": self.hparams.step_ranks(self.num_seq),
            "n_blocks": self.hparams.n_blocks,
        }

    # -- one BP step ----------------------------------------------------------------------
    def edit_micro_batches(self, tok, prompts: Sequence[str], targets: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Tokenised (prompt, target) tuples cut into micro-batches of ``micro_batch_size``."""
        size = self.hparams.micro_batch_size
        return [build_batch(tok, list(prompts[i:i + size]), list(targets[i:i + size]))
                for i in range(0, len(prompts), size)]

    def memory_budget(self) -> MemoryBudget:
        """A fresh budget for the batch-sized state of one training unit or edit (hparams ``cache_memory_mb``, ``spill_dir``)."""
        return MemoryBudget(self.hparams.cache_memory_mb, self.hparams.spill_dir)

    def bp_step(self, model: nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], step: int, *,
                update_normaliser: bool, prefix: Optional[FrozenPrefix] = None,
                for_meta_backward: bool = True, reduce: RowReduce = SINGLE,
                budget: Optional[MemoryBudget] = None) -> StepRecord:
        """Cache at the current weights, predict every module's shift with step ``step``'s network, apply them.

        ``prefix`` (see :meth:`frozen_prefix`) lets later steps on the same micro-batches skip the unedited layers.
        ``for_meta_backward=False`` (edit time) drops each module's cached rows and solver as soon as
        its shift is computed; the record then holds shifts only (otherwise call :meth:`StepRecord.release`
        once the meta-gradient is in). ``reduce``: ``micro_batches`` are this rank's share; normaliser
        statistics and solves use every rank's rows. ``budget``: cached rows past it go to spill files
        (default: this editor's :meth:`memory_budget`); every pass over the rows reads them in chunks.

        The host waits for the device once per step: one check that every solve succeeded and every
        weight plus its shift is finite, before any weight is written. When it fails (rarely), the step's
        shifts are computed again module by module, which names the module and the cause, or falls back
        to an LU solve where only the Cholesky factorisation failed.
        """
        pairs = [(n, self._modules_ref[n]) for n in self.module_names]
        batches = list(micro_batches)
        budget = budget if budget is not None else self.memory_budget()
        caches = cache_keys_and_value_grads(model, pairs, batches, storage_device=self.device, prefix=prefix,
                                            budget=budget)
        if update_normaliser:
            update_normalisers([self.net_for(step, pos).normaliser_update(caches[name])
                                for pos, name in enumerate(self.module_names)], reduce)
        shifts, solvers, flags = self._predict(step, caches, for_meta_backward, reduce, eager=False)
        if not bool(torch.stack(flags).all()):
            if not for_meta_backward:  # the rows were dropped module by module; no weight has changed yet
                caches = cache_keys_and_value_grads(model, pairs, batches, storage_device=self.device, prefix=prefix,
                                                    budget=budget)
            shifts, solvers, _ = self._predict(step, caches, for_meta_backward, reduce, eager=True)
        for name, shift in shifts.items():
            add_param_shift_(self._modules_ref[name], shift)
        return StepRecord(step, caches, shifts, solvers, reduce)

    def _predict(self, step: int, caches: dict[str, ModuleCache], keep: bool, reduce: RowReduce,
                 eager: bool) -> tuple[dict[str, torch.Tensor], dict[str, RidgeSolve], list[torch.Tensor]]:
        """Every module's shift, nothing written. ``eager``: check each module at once, naming it and the cause;
        otherwise return one device flag per module (solve healthy, weight plus shift finite) and never wait."""
        shifts, solvers, flags = {}, {}, []
        where = f"BP step {step + 1} of {self.hparams.bp_steps}"
        for pos, name in enumerate(self.module_names):
            c = caches[name] if keep else caches.pop(name)
            shift, solver = predict_param_shift(self.net_for(step, pos), self.module_idx[pos], c,
                                                chunk_size=self.hparams.chunk_size, reduce=reduce, check=eager)
            if not keep:
                c.release()
            del c
            module = self._modules_ref[name]
            if eager:
                require_finite(shift, method=self.hparams.alg_name, where=where, module=name, cause=SHIFT_CAUSE)
                require_finite(shifted_weight(module, shift), method=self.hparams.alg_name, where=where, module=name,
                               cause=OVERFLOW_CAUSE)
            else:
                finite = shifted_weight(module, shift).isfinite().all()
                flags.append(solver.healthy.to(self.device) & finite.to(self.device))
            shifts[name] = shift
            if keep:
                solvers[name] = solver
            del solver
        return shifts, solvers, flags

    def frozen_prefix(self, model: nn.Module, budget: Optional[MemoryBudget] = None) -> Optional[FrozenPrefix]:
        """A :class:`FrozenPrefix` for this editor's modules (its stored states within ``budget``), or None when
        ``reuse_frozen_prefix`` is off."""
        return FrozenPrefix(model, self.module_names, budget) if self.hparams.reuse_frozen_prefix else None

    def meta_backward(self, record: StepRecord, weight_grads: dict[str, torch.Tensor]) -> None:
        """Accumulate the hypernetwork gradient of a loss whose weight gradients are ``weight_grads``."""
        for pos, name in enumerate(self.module_names):
            accumulate_meta_grad(self.net_for(record.step, pos), self.module_idx[pos], record.caches[name],
                                 record.solvers[name], record.shifts[name], weight_grads[name].to(self.device),
                                 chunk_size=self.hparams.chunk_size, reduce=record.reduce)

    def unique_parameters(self) -> list[nn.Parameter]:
        """Every hypernetwork parameter once (a shared network is not listed per step, unlike the reference)."""
        seen: dict[int, nn.Parameter] = {}
        for p in self.nets.parameters():
            seen.setdefault(id(p), p)
        return list(seen.values())

    def set_normaliser_frozen(self, frozen: bool) -> None:
        for nets in self.nets:
            for net in nets.values():
                net.normaliser.frozen = frozen


def apply_steps(model: nn.Module, tok, editor: HypernetEditor, prompts: Sequence[str],
                targets: Sequence[str], after_step: Optional[Callable[[int], None]] = None) -> RoundingReport:
    """``bp_steps`` cumulative BP steps on (prompt, target) tuples, the normaliser frozen.

    With ``fp32_edit_weights`` (default for bf16/fp16 models) the steps stack in float32 weights
    that are rounded once at the end; the report holds that rounding error (empty in float32), is kept
    for :func:`~smedit_plugin.precision.last_rounding` and logged (WARNING above 10 % of a module's update).
    ``after_step(s)`` runs after step ``s`` (0-based) on the working weights, so a diagnostic can look at
    each step of the real edit instead of repeating its set-up.
    """
    mbs = editor.edit_micro_batches(tok, prompts, targets)
    modules = {n: editor.edit_module(n) for n in editor.module_names}
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    editor.set_normaliser_frozen(True)
    try:
        with float32_edit_weights(modules, wants_float32(modules, editor.hparams.fp32_edit_weights)) as rounding:
            for w in weights:
                w.requires_grad_(True)
            budget = editor.memory_budget()
            prefix = editor.frozen_prefix(model, budget)
            for s in range(editor.hparams.bp_steps):
                editor.bp_step(model, mbs, s, update_normaliser=False, prefix=prefix, for_meta_backward=False,
                               budget=budget)
                if after_step is not None:
                    after_step(s)
    finally:
        editor.set_normaliser_frozen(False)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    note_rounding(model, rounding, editor.hparams.alg_name, ROUNDING_FIX)
    return rounding


def edit_batch(model: nn.Module, tok, editor: HypernetEditor, prompts: Sequence[str], targets: Sequence[str],
               snapshot: Optional[WeightsSnapshot] = None) -> WeightsSnapshot:
    """The one road from (prompt, target) pairs to a hypernetwork weight update, used by every caller.

    Runs :func:`apply_steps` inside an :func:`edit_transaction` and returns the snapshot of the
    edited weights: the caller keeps the edit, hands it to EasyEdit as ``weights_copy``, or rolls
    back with ``snapshot.restore()``. Pass an earlier ``snapshot`` to let edits accumulate under it.
    """
    check_lengths(tok, prompts, targets, editor.hparams.max_length)
    check_targets(tok, targets)
    warn_contradictions(prompts, targets)
    with edit_transaction(model, snapshot) as snapshot:
        for name in editor.module_names:
            snapshot.capture_module(name)
        apply_steps(model, tok, editor, prompts, targets)
    return snapshot
