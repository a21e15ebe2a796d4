"""Local editing scope identification (paper Eq. 16-19): per-token z-scores of ``||dW k||`` and the threshold.

``m`` holds ``M_t = ||W_h k_t - W_0 k_t||`` for every token of every sequence (``[batch, seq]``).
The z-score is taken over the *valid* tokens of each sequence (padding and BOS masked, spec A1-A4)
with ``ddof`` (1 = unbiased, as the authors' code); a token is swapped to the hook output when
its z-score reaches ``alpha``. A sequence with fewer than two valid tokens or a (numerically)
constant ``M`` has no defined z-score and swaps nothing (A6), instead of relying on NaN rules.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

#: ``std <= STD_RTOL * mean`` counts as a constant ``M`` (rounding noise of identical ``dW k``).
STD_RTOL = 1e-6


def _moments(m: torch.Tensor, valid: torch.Tensor, ddof: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence deviations from the valid-token mean, the std, and whether the z-score is defined."""
    weights = valid.to(m.dtype)
    n = weights.sum(-1, keepdim=True)
    mean = (m * weights).sum(-1, keepdim=True) / n.clamp(min=1.0)
    dev = (m - mean) * weights
    std = ((dev * dev).sum(-1, keepdim=True) / (n - ddof).clamp(min=1.0)).sqrt()
    defined = (n >= 2) & (std > STD_RTOL * mean)
    return dev, std, defined


def swap_mask(m: torch.Tensor, valid: torch.Tensor, alpha: Union[float, torch.Tensor], ddof: int = 1) -> torch.Tensor:
    """Tokens whose z-score is at least ``alpha`` (``[batch, seq]`` bool); ``dev >= alpha*std`` avoids 0/0."""
    dev, std, defined = _moments(m, valid, ddof)
    return valid & defined & (dev >= alpha * std)


def zscores(m: torch.Tensor, valid: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """z-scores of valid tokens in sequences where they are defined, NaN elsewhere."""
    dev, std, defined = _moments(m, valid, ddof)
    z = dev / torch.where(defined, std, torch.ones_like(std))
    return torch.where(valid & defined, z, torch.full_like(z, float("nan")))


def max_zscore(m: torch.Tensor, valid: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """``Z_x``: the largest token z-score of each sequence (NaN where undefined)."""
    z = zscores(m, valid, ddof)
    best = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z).amax(-1)
    return torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)


def alpha_candidate(max_z: torch.Tensor) -> Optional[float]:
    """``alpha_c``: the smallest ``Z_x`` of the batch (spec A10), ignoring sequences without a z-score."""
    defined = max_z[~torch.isnan(max_z)]
    return float(defined.min()) if defined.numel() else None


def next_alpha(alpha: float, candidate: Optional[float]) -> float:
    """Eq. 19 as the authors' code applies it: ``alpha <- min(alpha, alpha_c)`` after every step (A8)."""
    return alpha if candidate is None else min(alpha, candidate)


def zscore_bound(n: int, ddof: int = 1) -> float:
    """Largest z-score ``n`` values can reach (one outlier): ``sqrt((n-1)(n-ddof)/n)``, ``(n-1)/sqrt(n)`` unbiased.

    With ``alpha = 2.2`` no input of 6 or fewer valid tokens can ever be edited (spec 2.6).
    """
    if n < 2:
        return float("nan")
    return math.sqrt((n - 1) * (n - ddof) / n)
