"""MALMEN2 / MALMEN1 hyperparameters (SMEdit paper Table 3 defaults)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..hypernet.hparams import HypernetHyperParams
from ..methods import alg_names_of

F = dataclasses.field
_NAMES = alg_names_of(f"{__name__}:MALMEN2HyperParams")


@dataclasses.dataclass(kw_only=True)
class MALMEN2HyperParams(HypernetHyperParams):
    """MALMEN with ``bp_steps`` steps sharing one network; loss = CE(rephrase) + loc_coef * KL(unrelated).

    ``alg_name: MALMEN1`` is the one-step baseline (``bp_steps`` defaults to 1 there, 2 for MALMEN2).
    """

    ALG_NAMES: ClassVar[tuple[str, ...]] = _NAMES
    SHARED_DEFAULT: ClassVar[str] = "always"

    alg_name: str = _NAMES[0]
    bp_steps: Optional[int] = F(default=None, metadata={"range": (1, 16), "help": "null = 2 for MALMEN2, 1 for MALMEN1"})
    loc_coef: float = F(default=0.6, metadata={"range": (0.0, None)})

    def locality_coef(self) -> float:
        return self.loc_coef
