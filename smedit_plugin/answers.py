"""Where the answer is: answer-position logits and labels of a micro-batch, and scoring without dropout.

The ground floor of training, evaluation and general-capability checks alike. Labels are pre-shifted
by the data pipeline: logits at position ``i`` predict ``labels[i]``, and only positions with
``labels != -100`` matter. Logits are computed only there when the model's forward supports
``logits_to_keep`` (the model's own head then applies any soft-capping), otherwise for the whole
sequence and then selected.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from .devices import model_input_device
from .text import answer_mask

REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


class AnswerRows:
    """Flat row indices of a micro-batch's answer positions, built on the host once and sent to each device once.

    Gathering rows with them (``index_select``) has a shape known on the host; a boolean-mask index
    on a GPU tensor has to wait for the device to count the mask (a host synchronisation per module
    and micro-batch).
    """

    def __init__(self, mask: Tensor) -> None:
        self.shape = tuple(mask.shape)
        self._index = {torch.device("cpu"): mask.cpu().reshape(-1).nonzero().squeeze(1)}

    def on(self, device: torch.device) -> Tensor:
        if device not in self._index:
            self._index[device] = self._index[torch.device("cpu")].to(device, non_blocking=True)
        return self._index[device]

    def gather(self, tensor: Tensor) -> Tensor:
        """``tensor[mask]`` for a ``[batch, seq, ...]`` tensor: rows (example, position) row-major."""
        return tensor.reshape(-1, *tensor.shape[2:]).index_select(0, self.on(tensor.device))


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


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (then logits are computed only where asked)."""
    parameter = inspect.signature(model.forward).parameters.get("logits_to_keep")
    return parameter is not None and parameter.kind is not inspect.Parameter.VAR_KEYWORD


def answer_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits ``[P, vocab]`` at the answer positions of a micro-batch, ordered like :func:`answer_labels`.

    Does not pass ``labels`` to the model (HF would compute an unused, differently shifted loss).
    """
    check_micro_batch(batch)
    device = model_input_device(model)
    mask = answer_mask(batch["labels"]).cpu()
    # host tensors go to the device without waiting for it (a blocking copy synchronises the stream)
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "attention_mask": batch["attention_mask"].to(device, non_blocking=True), "use_cache": False}
    if not accepts_logits_to_keep(model):
        return AnswerRows(mask).gather(model(**inputs).logits)
    positions = mask.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=positions).logits
    if logits.shape[1] != positions.numel():
        raise RuntimeError(f"{type(model).__name__} ignored logits_to_keep (got {logits.shape[1]} positions, "
                           f"expected {positions.numel()})")
    return AnswerRows(mask[:, positions]).gather(logits)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while scoring, the caller's mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
