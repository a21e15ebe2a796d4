"""The losses of meta-training, built on the answer-position logits of :mod:`smedit_plugin.answers`
(meta-editing spec §2.1, §2.2, §8.11). Losses are taken in fp32 whatever the model dtype.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..answers import answer_labels, answer_logits


def token_mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy averaged over the ``P`` selected tokens, computed in fp32."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [P, vocab] and targets [P], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return F.cross_entropy(logits.float(), targets.to(logits.device, non_blocking=True))


def answer_cross_entropy(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Token-mean CE over the answer positions of one micro-batch (multi-batch losses sum these)."""
    return token_mean_cross_entropy(answer_logits(model, batch), answer_labels(batch))


def kl_locality(ref_logits: Tensor, edit_logits: Tensor) -> Tensor:
    """``KL(ref ‖ edit)`` summed over the vocabulary and averaged over the ``P`` selected positions."""
    if ref_logits.shape != edit_logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"ref_logits and edit_logits must both be [P, vocab], got {tuple(ref_logits.shape)} "
                         f"and {tuple(edit_logits.shape)}")
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1).to(edit_logits.device)
    edit_logp = torch.log_softmax(edit_logits.float(), dim=-1)
    return F.kl_div(edit_logp, ref_logp, reduction="batchmean", log_target=True)
