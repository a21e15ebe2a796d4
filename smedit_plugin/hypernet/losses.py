"""Answer-position logits and the losses built on them (meta-editing spec §2.1, §2.2, §8.11).

Labels are pre-shifted by the data pipeline: logits at position ``i`` predict ``labels[i]``, and only
positions with ``labels != -100`` matter. Logits are computed only there when the model's forward
supports ``logits_to_keep`` (the model's own head then applies any soft-capping), otherwise for the
whole sequence and then selected. Losses are taken in fp32 whatever the model dtype.
"""
from __future__ import annotations

import inspect
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import model_input_device
from ..text import answer_mask

REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


def check_micro_batch(batch: Mapping[str, Tensor]) -> None:
    """Raise before any forward when a micro-batch lacks a field or has mismatched shapes."""
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if missing:
        raise ValueError(f"micro-batch is missing {missing}; it needs input_ids, attention_mask and pre-shifted "
                         f"labels (-100 outside the answer)")
    shapes = {key: tuple(batch[key].shape) for key in REQUIRED_KEYS}
    if len(set(shapes.values())) != 1 or len(shapes["labels"]) != 2:
        raise ValueError(f"input_ids, attention_mask and labels must all be [batch, seq], got {shapes}")
    if not answer_mask(batch["labels"]).any():
        raise ValueError("micro-batch has no answer positions (all labels are -100); check the tokenisation")


def answer_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """Target token ids at the answer positions, ``[P]``, ordered (example, position) row-major."""
    labels = batch["labels"]
    return labels[answer_mask(labels)]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    parameter = inspect.signature(model.forward).parameters.get("logits_to_keep")
    return parameter is not None and parameter.kind is not inspect.Parameter.VAR_KEYWORD


def answer_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits ``[P, vocab]`` at the answer positions of a micro-batch, ordered like :func:`answer_labels`.

    Does not pass ``labels`` to the model (HF would compute an unused, differently shifted loss).
    """
    check_micro_batch(batch)
    device = model_input_device(model)
    mask = answer_mask(batch["labels"]).cpu()
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
              "use_cache": False}
    if not _accepts_logits_to_keep(model):
        logits = model(**inputs).logits
        return logits[mask.to(logits.device)]
    positions = mask.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=positions).logits
    if logits.shape[1] != positions.numel():
        raise RuntimeError(f"{type(model).__name__} ignored logits_to_keep (got {logits.shape[1]} positions, "
                           f"expected {positions.numel()})")
    return logits[mask[:, positions].to(logits.device)]


def token_mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy averaged over the ``P`` selected tokens, computed in fp32."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [P, vocab] and targets [P], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return F.cross_entropy(logits.float(), targets.to(logits.device))


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
