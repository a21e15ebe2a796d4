"""Perplexity of a model on plain text, in sliding windows (meta-editing spec §5, the probe's second half)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .devices import model_input_device
from .answers import eval_mode
from .shipped import WIKITEXT2_TEST

PathLike = Union[str, os.PathLike]


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text by default (a BOS for Llama 3 / Gemma, none for SmolLM2)."""
    full = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def token_perplexity(
    model: nn.Module,
    token_ids: Sequence[int],
    *,
    window: int = 512,
    stride: Optional[int] = None,
    prefix_ids: Sequence[int] = (),
    bar: Optional[tqdm] = None,
) -> float:
    """``exp`` of the mean next-token NLL over ``token_ids``, read in windows of ``window`` tokens.

    Windows start every ``stride`` tokens (default ``window``: non-overlapping) and each token is
    predicted once, by the first window that holds it with context: with overlapping windows the
    overlap is context only. ``prefix_ids`` (e.g. a BOS) lead every window, so that window's first
    token is predicted too; without them the first token of a non-overlapping window is not.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    step = window if stride is None else stride
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= window:
        raise ValueError(f"stride must be an int in [1, window={window}] or None, got {stride!r}")
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    prefix = [int(t) for t in prefix_ids]
    device = model_input_device(model)
    total, count, scored_to = 0.0, 0, 0
    if bar is not None:
        bar.reset(total=math.ceil(max(len(ids) - window, 0) / step) + 1)
    with torch.no_grad(), eval_mode(model):
        for begin in range(0, len(ids), step):
            end = min(begin + window, len(ids))
            first = max(begin if prefix else begin + 1, scored_to)
            if first < end:
                inputs = torch.tensor([prefix + ids[begin:end]], device=device)
                logits = model(input_ids=inputs, use_cache=False).logits[0]
                rows = torch.arange(first - begin, end - begin, device=logits.device) + len(prefix) - 1
                targets = torch.tensor(ids[first:end], device=logits.device)
                total += float(F.cross_entropy(logits[rows].float(), targets, reduction="sum"))
                count += end - first
                scored_to = end
            if bar is not None:
                bar.update(1)
            if end == len(ids):
                break
    return math.exp(total / count)


def read_text_tokens(tokenizer: Any, text_path: Optional[PathLike] = None, max_tokens: int = 4096) -> list[int]:
    """The first ``max_tokens`` token ids of a text file (without special tokens); fewer if the file is shorter."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
    path = Path(text_path).expanduser() if text_path is not None else WIKITEXT2_TEST
    if not path.is_file():
        raise FileNotFoundError(f"perplexity text {path} not found; pass text_path=<a plain-text file> "
                                f"(the default is the packaged {WIKITEXT2_TEST.name})")
    text = path.read_text(encoding="utf-8")
    size = max_tokens * 8
    while True:
        ids = list(tokenizer(text[:size], add_special_tokens=False)["input_ids"])
        if len(ids) > max_tokens or size >= len(text):
            return ids[:max_tokens]
        size *= 2


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text_path: Optional[PathLike] = None,
    *,
    max_tokens: int = 4096,
    window: int = 512,
    stride: Optional[int] = None,
    bar: Optional[tqdm] = None,
) -> float:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of ``text_path`` (default: WikiText-2 test).

    Windows as in :func:`token_perplexity`; every window starts with the tokenizer's own leading
    special tokens (BOS), if it adds any.
    """
    ids = read_text_tokens(tokenizer, text_path, max_tokens)
    return token_perplexity(model, ids, window=window, stride=stride, prefix_ids=special_prefix(tokenizer), bar=bar)
