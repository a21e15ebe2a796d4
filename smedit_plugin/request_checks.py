"""Checks every edit road runs on its requests before a weight is touched (beyond the per-field checks of each family).

* Length: a prompt plus its target longer than the hparams' ``max_length`` tokens is **refused**, naming
  the request. Truncating would cut the subject or the target, i.e. silently edit a different fact.
* ``locality`` (EasyEdit's ``{name: {"prompt": ..., "ground_truth": ...}}``): a malformed entry is refused,
  because EasyEdit would otherwise fail or mis-score it only after the edit.
* The same prompt with two different targets in one batch: both cannot hold, so a warning names them.
* Targets the model cannot be taught as text are **refused**: one holding a special token of the tokenizer
  (``<|endoftext|>``: it becomes a control token, not text), one holding an invisible character (a zero-width
  space, a byte-order mark: copied text often carries one, and the model would learn to emit it), and one
  with nothing visible at all.
"""
from __future__ import annotations

import unicodedata
import warnings
from typing import Any, Mapping, Sequence

from .text import tokenize_pair


def check_lengths(tok: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int) -> None:
    """Refuse a request whose prompt + target tokens exceed ``max_length`` (hparams field ``max_length``)."""
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        prompt_ids, target_ids = tokenize_pair(tok, prompt, target)
        n = len(prompt_ids) + len(target_ids)
        if n > max_length:
            raise ValueError(f"request {i} ({prompt[:40]!r}...) is {n} tokens (prompt + target), over the hparams field "
                             f"max_length = {max_length}; shorten it or raise max_length (requests are refused, "
                             "never truncated, since truncation would edit another fact)")


#: Invisible characters still allowed inside visible text: zero-width (non-)joiners shape emoji and Indic scripts.
_JOINERS = frozenset("\u200c\u200d")


def _invisible(char: str) -> bool:
    """A format or control character (Unicode Cf/Cc) other than tab, newline and the joiners."""
    return unicodedata.category(char) in ("Cf", "Cc") and char not in "\t\n" and char not in _JOINERS


def check_targets(tok: Any, targets: Sequence[str]) -> None:
    """Refuse a target holding a special token of ``tok``, an invisible character, or nothing visible."""
    specials = set(getattr(tok, "all_special_tokens", None) or [])
    specials |= {str(t) for t in (getattr(tok, "added_tokens_decoder", None) or {}).values()
                 if getattr(t, "special", False)}
    for i, target in enumerate(targets):
        found = sorted(t for t in specials if t and t in target)
        if found:
            raise ValueError(f"request {i}: target_new {target!r} holds the tokenizer's special token {found[0]!r}, which "
                             "becomes a control token (end of text, chat markup), not text the model can be taught "
                             "to say; remove it from the target")
        hidden = [(at, ch) for at, ch in enumerate(target) if _invisible(ch)]
        if hidden:
            at, ch = hidden[0]
            raise ValueError(f"request {i}: target_new {target!r} holds an invisible character U+{ord(ch):04X} "
                             f"({unicodedata.name(ch, 'unnamed')}) at position {at}; remove it (copied text often "
                             "carries one, and the model would learn to emit it)")
        if not any(not ch.isspace() and ch not in _JOINERS for ch in target):
            raise ValueError(f"request {i}: target_new {target!r} has no visible character; give the new answer as text")


def warn_contradictions(prompts: Sequence[str], targets: Sequence[str]) -> None:
    """Warn when one prompt is asked to give two different targets in the same batch."""
    first: dict[str, tuple[int, str]] = {}
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        key = " ".join(prompt.split())
        if key in first and first[key][1].strip() != target.strip():
            j, other = first[key]
            warnings.warn(f"requests {j} and {i} give the same prompt {prompt!r} two targets ({other!r} and "
                          f"{target!r}); at most one can hold after the edit", stacklevel=3)
        first.setdefault(key, (i, target))


def _texts(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, (str, list)) for v in value))


def check_locality(requests: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a ``locality`` field that is not ``{name: {"prompt": text(s), "ground_truth": text(s)}}``."""
    for i, request in enumerate(requests):
        locality = request.get("locality")
        if locality is None:
            continue
        if not isinstance(locality, Mapping):
            raise ValueError(f"request {i}: field 'locality' must be a dict of name -> {{'prompt', 'ground_truth'}}, "
                             f"got {type(locality).__name__}")
        for name, entry in locality.items():
            if not isinstance(entry, Mapping) or not {"prompt", "ground_truth"} <= set(entry):
                raise ValueError(f"request {i}: locality[{name!r}] must be a dict with 'prompt' and 'ground_truth', "
                                 f"got {entry!r}")
            prompt, truth = entry["prompt"], entry["ground_truth"]
            if not _texts(prompt) or not _texts(truth):
                raise ValueError(f"request {i}: locality[{name!r}] 'prompt' and 'ground_truth' must be non-empty "
                                 f"strings or lists of them, got {prompt!r} and {truth!r}")
            if isinstance(prompt, list) and isinstance(truth, list) and len(prompt) != len(truth):
                raise ValueError(f"request {i}: locality[{name!r}] has {len(prompt)} prompts but {len(truth)} "
                                 "ground truths; give one per prompt")
