"""Hyperparameters shared by every hypernetwork method (MALMEN1/2, RLEdit1/2, SMEdit).

One class serves both the editing YAML (``hparams/<METHOD>/``) and the training YAML
(``hparams/TRAINING/<METHOD>/``), so the two cannot drift apart the way EasyEdit's MEND files do
(EasyEdit issues #533, #552): training fields simply have defaults an editing file need not repeat.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from ..hparams_base import MethodHyperParams
from ..methods import method_spec

F = dataclasses.field


def _modules_present(hp: "HypernetHyperParams") -> Optional[str]:
    if not hp.edit_modules:
        return "field 'edit_modules' is empty; list the linear modules to edit (e.g. model.layers.12.mlp.up_proj)"
    if len(set(hp.edit_modules)) != len(hp.edit_modules):
        return "field 'edit_modules' lists a module twice; remove the duplicate"
    return None


def _strip_weight_suffix(hp: "HypernetHyperParams") -> Optional[str]:
    hp.edit_modules = [m[: -len(".weight")] if m.endswith(".weight") else m for m in hp.edit_modules]
    return None


def _rank_fits(hp: "HypernetHyperParams") -> Optional[str]:
    if hp.rank_decay and not hp.shared_hypernet_for(hp.num_seq) and hp.rank // hp.bp_steps < 1:
        return f"rank {hp.rank} is too small for {hp.bp_steps} BP steps with rank decay (rank // bp_steps must be >= 1)"
    return None


def _max_steps_not_zero(hp: "HypernetHyperParams") -> Optional[str]:
    if hp.max_steps == 0:
        return "field 'max_steps' = 0 would train nothing; use -1 for one full pass or a positive number of units"
    return None


def _fill_bp_steps(hp: "HypernetHyperParams") -> Optional[str]:
    """A null ``bp_steps`` takes the method's default from the table (1 for the one-step baselines)."""
    if hp.bp_steps is None:
        hp.bp_steps = method_spec(hp.alg_name).default_bp_steps
    return None


@dataclasses.dataclass(kw_only=True)
class HypernetHyperParams(MethodHyperParams):
    """Fields of the MALMEN-style hypernetwork, its meta-training and edit-time application."""

    edit_modules: list[str] = F(metadata={"help": "linear modules whose weights are edited (module names; '.weight' is stripped)"})
    archive: Optional[str] = F(default=None, metadata={"help": "trained hypernetwork archive directory (from `smedit train`)"})
    bp_steps: int = F(default=1, metadata={"range": (1, 16), "help": "backpropagation steps per edit batch (MSBP)"})
    rank: int = F(default=1024, metadata={"range": (1, None)})
    n_blocks: int = F(default=4, metadata={"range": (1, None)})
    lr: float = F(default=1e-6, metadata={"range": (0.0, None), "help": "initial per-module edit learning rate"})
    meta_lr: float = F(default=1e-5, metadata={"range": (0.0, None)})
    max_grad_norm: float = F(default=1.0, metadata={"range": (0.0, None)})
    shared_hypernet: Optional[bool] = F(default=None, metadata={"help": "one network for all BP steps; null = method default"})
    rank_decay: bool = F(default=True, metadata={"help": "step-specific networks get rank // step (1-based)"})
    chunk_size: int = F(default=1024, metadata={"range": (1, None), "help": "hypernetwork rows per chunk (no effect on results)"})
    cache_memory_mb: Optional[float] = F(default=1024.0, metadata={"range": (0.0, None), "help": "megabytes of batch-sized state (cached keys and value gradients, locality reference logits, frozen-prefix states) one edit or training unit keeps in memory; the rest goes to a temporary file and is read back in chunks (same results); null = no limit"})
    spill_dir: Optional[str] = F(default=None, metadata={"help": "folder of the temporary files past cache_memory_mb (deleted when done); null = the system's temporary folder"})
    micro_batch_size: int = F(default=4, metadata={"range": (1, None), "help": "examples per LLM forward; losses are summed over micro-batches"})
    model_dtype: Optional[str] = F(default=None, metadata={"choices": ("float32", "bfloat16", "float16"), "help": "dtype the model is loaded in; null = float16 if fp16 else float32"})
    fp32_edit_weights: Optional[bool] = F(default=None, metadata={"help": "hold the edit modules in float32 during an edit and round once at the end (costs one float32 copy of each edited weight); null = on for bf16/fp16 models"})
    shift_penalty_norm: str = F(default="absolute", metadata={"choices": ("absolute", "relative"), "help": "form of the l2 penalty on each shift (methods with reg_coef): absolute = reg_coef * ||shift||^2 as in the papers; relative = reg_coef * ||shift||^2 / ||W||^2 per module, which does not depend on the model's width"})
    reuse_frozen_prefix: bool = F(default=True, metadata={"help": "compute the layers below the lowest edit module once per micro-batch and reuse them across BP steps and loss passes (same results; false = recompute, for checking)"})
    hypernet_device: Optional[Union[int, str]] = F(default=None, metadata={"help": "device of the hypernetwork; null = the model's device"})
    # meta-training
    n_edits: int = F(default=64, metadata={"range": (1, None), "help": "facts per training edit batch"})
    num_seq: int = F(default=1, metadata={"range": (1, None), "help": "edit batches per sequence (1 = batch editing)"})
    n_epochs: int = F(default=1, metadata={"range": (1, None)})
    max_steps: int = F(default=-1, metadata={"range": (-1, None), "help": "training batches (batch mode) or sequences; -1 = one full pass"})
    cumulative_steps: bool = F(default=True, metadata={"help": "BP steps stack during training as at edit time (paper); false = reference code"})
    reference_adam_duplicates: bool = F(default=False, metadata={"help": "with one network shared by the BP steps, apply each Adam update bp_steps times, as the reference code does by listing the network once per step (spec §1.6, §7 item 11); false = once"})
    val_interval: int = F(default=0, metadata={"range": (0, None), "help": "also validate (without validation records: checkpoint) every N training units: batches, or trajectories when num_seq > 1; with validation records every epoch end is validated anyway"})
    val_n_edits: int = F(default=64, metadata={"range": (1, None), "help": "facts per edit batch of the ES/GS/LS check on the validation records"})
    val_fraction: float = F(default=0.0, metadata={"range": (0.0, 0.5), "help": "share of the training records held out (seeded) as the validation split when no validation file is given; 0 = none"})
    early_stop_patience: int = F(default=0, metadata={"range": (0, None), "help": "stop after this many validations without a lower validation loss (0 = run every epoch); the archive keeps the best networks either way"})
    seed: int = F(default=0, metadata={"range": (0, 2**32 - 1), "help": "seed of the network initialisation and the training order"})

    _checks: ClassVar[tuple] = (_modules_present, _strip_weight_suffix, _fill_bp_steps, _rank_fits, _max_steps_not_zero)
    #: Method defaults for ``shared_hypernet`` when the field is null.
    SHARED_DEFAULT: ClassVar[str] = "always"

    def shared_hypernet_for(self, num_seq: int) -> bool:
        """Whether one network serves every BP step (MALMEN2, SMEdit batch) or each step has its own."""
        if self.shared_hypernet is not None:
            return self.shared_hypernet
        if self.SHARED_DEFAULT == "always":
            return True
        if self.SHARED_DEFAULT == "never":
            return False
        return num_seq == 1

    # -- the meta-loss each method declares (read by MetaTrainer) ---------------------------
    def locality_coef(self) -> float:
        """Weight of the KL term on unrelated prompts; 0 = no such term (no reference logits are computed)."""
        return 0.0

    def shift_penalty_coef(self) -> float:
        """Weight of the l2 penalty on each step's ``param_shift``; 0 = none."""
        return 0.0

    def trajectory_weights(self, batch_index: int) -> list[float]:
        """Loss weights of batch ``batch_index`` of a trajectory and of earlier batches re-scored with it (newest first)."""
        return [1.0]

    def shift_penalty_scale(self, batch_index: int) -> float:
        """Factor on the shift penalty of batch ``batch_index`` of a trajectory."""
        return 1.0

    def step_ranks(self, num_seq: Optional[int] = None) -> list[int]:
        """Rank of each BP step's network (rank // s for step-specific networks with decay)."""
        seq = self.num_seq if num_seq is None else num_seq
        if self.shared_hypernet_for(seq) or not self.rank_decay:
            return [self.rank] * self.bp_steps
        return [max(1, self.rank // (s + 1)) for s in range(self.bp_steps)]
