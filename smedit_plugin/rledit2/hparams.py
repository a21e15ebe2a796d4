"""RLEdit2 / RLEdit1 hyperparameters (SMEdit paper Table 3 defaults)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..hypernet.hparams import HypernetHyperParams
from ..methods import alg_names_of

F = dataclasses.field
_NAMES = alg_names_of(f"{__name__}:RLEdit2HyperParams")


def backtracking_weights(batch_index: int, back_depth: int, discount: float, time_decay: float) -> list[float]:
    """RLEdit loss weights ``gamma^i * mu^j`` of batch ``i - j`` for j = 0 (current) .. ``back_depth - 1``.

    Memory backtracking re-scores up to ``back_depth - 1`` earlier batches of the trajectory (fewer
    at its start); ``gamma^i`` discounts late batches (spec §4.3, §7 item 5).
    """
    depth = min(batch_index + 1, back_depth)
    return [discount ** batch_index * time_decay ** j for j in range(depth)]


@dataclasses.dataclass(kw_only=True)
class RLEdit2HyperParams(HypernetHyperParams):
    """RLEdit: sequential trajectories, discounted loss with memory backtracking, KL locality, l2 on each shift.

    Step-specific networks with rank decay (as the reference code does for RLEdit2).
    """

    ALG_NAMES: ClassVar[tuple[str, ...]] = _NAMES
    SHARED_DEFAULT: ClassVar[str] = "never"

    alg_name: str = _NAMES[0]
    bp_steps: Optional[int] = F(default=None, metadata={"range": (1, 16), "help": "null = 2 for RLEdit2, 1 for RLEdit1"})
    num_seq: int = F(default=10, metadata={"range": (1, None)})
    n_edits: int = F(default=20, metadata={"range": (1, None)})
    loc_coef: float = F(default=0.6, metadata={"range": (0.0, None)})
    reg_coef: float = F(default=1e-4, metadata={"range": (0.0, None), "help": "eta: l2 penalty on each step's shift (acts on the shift, unlike the reference code)"})
    discount: float = F(default=1.0, metadata={"range": (0.0, 1.0), "help": "gamma: weight gamma^i of the i-th batch of a trajectory"})
    back_depth: int = F(default=10, metadata={"range": (1, None), "help": "memory backtracking: current batch plus back_depth - 1 earlier ones"})
    time_decay: float = F(default=0.95, metadata={"range": (0.0, 1.0), "help": "mu: weight mu^j of the batch j steps back"})

    def locality_coef(self) -> float:
        return self.loc_coef

    def shift_penalty_coef(self) -> float:
        return self.reg_coef

    def trajectory_weights(self, batch_index: int) -> list[float]:
        return backtracking_weights(batch_index, self.back_depth, self.discount, self.time_decay)

    def shift_penalty_scale(self, batch_index: int) -> float:
        return self.discount ** batch_index
