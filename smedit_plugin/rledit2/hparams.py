"""RLEdit2 / RLEdit1 hyperparameters (SMEdit paper Table 3 defaults)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..hypernet.hparams import HypernetHyperParams, default_bp_steps

F = dataclasses.field


@dataclasses.dataclass(kw_only=True)
class RLEdit2HyperParams(HypernetHyperParams):
    """RLEdit: sequential trajectories, discounted loss with memory backtracking, KL locality, l2 on each shift.

    Step-specific networks with rank decay (as the reference code does for RLEdit2).
    """

    ALG_NAMES: ClassVar[tuple[str, ...]] = ("RLEdit2", "RLEdit1")
    SHARED_DEFAULT: ClassVar[str] = "never"

    alg_name: str = "RLEdit2"
    bp_steps: Optional[int] = F(default=None, metadata={"range": (1, 16), "help": "null = 2 for RLEdit2, 1 for RLEdit1"})
    num_seq: int = F(default=10, metadata={"range": (1, None)})
    n_edits: int = F(default=20, metadata={"range": (1, None)})
    loc_coef: float = F(default=0.6, metadata={"range": (0.0, None)})
    reg_coef: float = F(default=1e-4, metadata={"range": (0.0, None), "help": "eta: l2 penalty on each step's shift (acts on the shift, unlike the reference code)"})
    discount: float = F(default=1.0, metadata={"range": (0.0, 1.0), "help": "gamma: weight gamma^i of the i-th batch of a trajectory"})
    back_depth: int = F(default=10, metadata={"range": (1, None), "help": "memory backtracking: current batch plus back_depth - 1 earlier ones"})
    time_decay: float = F(default=0.95, metadata={"range": (0.0, 1.0), "help": "mu: weight mu^j of the batch j steps back"})

    _checks: ClassVar[tuple] = HypernetHyperParams._checks[:2] + (default_bp_steps("RLEdit1"),) + HypernetHyperParams._checks[2:]
