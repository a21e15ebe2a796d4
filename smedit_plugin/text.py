"""Tokenisation of (prompt, answer) pairs shared by training, editing and evaluation (spec meta-editing §3.1).

One layout everywhere: input = prompt ++ answer[:-1], right padded, with pre-shifted ``labels``
(``labels[i]`` is the token that the logits at position ``i`` must predict, -100 elsewhere). So
the positions where ``labels != -100`` are exactly the ones whose logits predict answer tokens,
which is where keys and value gradients are cached and where metrics are read.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence, TypeVar, Union

import torch

IGNORE_INDEX = -100
T = TypeVar("T")


def answer_text(answer: str) -> str:
    """The answer as appended to a prompt: one leading space unless it already starts with whitespace."""
    return answer if answer[:1].isspace() else " " + answer


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (read only: the tokenizer is never modified)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad_token_id nor an eos_token_id; set tokenizer.pad_token")
    return int(pad)


def _check_texts(prompts: Sequence[str], answers: Sequence[str]) -> None:
    for field, values in (("prompts", prompts), ("answers", answers)):
        if isinstance(values, str):
            raise ValueError(f"{field} must be a list of strings, not a single string")
        if len(values) == 0:
            raise ValueError(f"{field} is empty; pass at least one (prompt, answer) pair")
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers differ in length ({len(prompts)} vs {len(answers)}); pair them one to one")
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}] is empty or not a string ({prompt!r}); every example needs a prompt")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answers[{i}] is empty or not a string ({answer!r}); every example needs an answer")


def tokenize_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's default special tokens) and of the spaced answer."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer_text(answer), add_special_tokens=False)["input_ids"])
    return prompt_ids, answer_ids


def encode_pairs(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Validated ``(input_ids, labels)`` rows, unpadded. Raises before anything is built."""
    _check_texts(prompts, answers)
    rows = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenize_pair(tokenizer, prompt, answer)
        if not answer_ids:
            raise ValueError(f"answers[{i}] ({answer!r}) tokenises to zero tokens; give a non-empty answer")
        if not prompt_ids:
            raise ValueError(f"prompts[{i}] ({prompt!r}) tokenises to zero tokens")
        rows.append((prompt_ids + answer_ids[:-1], [IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids))
    return rows


def collate(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Union[str, torch.device, None] = None
) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into ``input_ids`` / ``attention_mask`` / ``labels`` tensors."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if device is not None:
        batch = {key: value.to(device) for key, value in batch.items()}
    return batch


def build_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    device: Union[str, torch.device, None] = None,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and pre-shifted ``labels`` for (prompt, answer) pairs.

    With n prompt tokens and m answer tokens an example has n+m-1 positions; position n-1+j
    predicts answer token j. Raises ``ValueError`` naming the index and field of an empty prompt
    or an answer that tokenises to nothing, before any tensor is built.
    """
    return collate(encode_pairs(tokenizer, prompts, answers), pad_token_id(tokenizer), device)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"micro-batch size must be a positive int, got {size!r}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iter_micro_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    micro_batch_size: int,
    device: Union[str, torch.device, None] = None,
) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch)`` for consecutive micro-batches; ``indices`` map rows back to the inputs.

    Every pair is tokenised and validated when this is called, before any micro-batch exists.
    """
    rows = encode_pairs(tokenizer, prompts, answers)
    parts = list(chunks(rows, micro_batch_size))
    return _collated(parts, pad_token_id(tokenizer), device)


def _collated(
    parts: list[Sequence[tuple[list[int], list[int]]]], pad_id: int, device: Union[str, torch.device, None]
) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    start = 0
    for part in parts:
        yield range(start, start + len(part)), collate(part, pad_id, device)
        start += len(part)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, seq)`` mask of the positions whose logits predict answer tokens (pre-shifted labels)."""
    return labels != IGNORE_INDEX


def label_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Number of answer tokens per row (row-major order of :func:`answer_mask`)."""
    return answer_mask(batch["labels"]).sum(dim=1).tolist()
