"""SMEdit hyperparameters (paper Table 3 defaults)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..hypernet.hparams import HypernetHyperParams
from ..methods import alg_names_of

F = dataclasses.field
_NAMES = alg_names_of(f"{__name__}:SMEditHyperParams")


@dataclasses.dataclass(kw_only=True)
class SMEditHyperParams(HypernetHyperParams):
    """SMEdit: ``bp_steps`` cumulative steps, loss = CE + reg_coef * sum_s ||param_shift_s||^2 (Eq. 7), no KL.

    Batch editing (``num_seq: 1``) trains one shared network with step-wise updating; sequential
    editing trains step-specific networks with rank decay and one meta-update per sequence.
    """

    ALG_NAMES: ClassVar[tuple[str, ...]] = _NAMES
    SHARED_DEFAULT: ClassVar[str] = "batch_only"

    alg_name: str = _NAMES[0]
    bp_steps: int = F(default=2, metadata={"range": (1, 16)})
    reg_coef: float = F(default=0.5, metadata={"range": (0.0, None), "help": "eta of Eq. 7, the l2 norm constraint on each step's shift"})

    def shift_penalty_coef(self) -> float:
        return self.reg_coef
