"""Edit requests, context templates and tokenisation shared by keys, target values and calibration.

A request is kept as the text around its subject (never as a ``str.format`` template, so
braces in a prompt are harmless). Token ids are built as ``leading specials + text ids (+ target
ids)`` so the subject-last-token index is exact and no trailing special token sneaks in
between prompt and target. Padding is done here, on the right, so the caller's tokenizer is
never touched (no padding-side or pad-token changes).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

#: Seed words of MEMIT's self-generated context templates.
TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")
#: MEMIT's top-k for sampling context templates.
TEMPLATE_TOP_K = 5
#: The "essence" prompt of the KL term, filled with the subject.
KL_PROMPT_SUFFIX = " is a"


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit: the prompt split around its subject, and the new target (with a leading space)."""

    before: str
    subject: str
    after: str
    target_new: str

    @property
    def prompt(self) -> str:
        return self.before + self.subject + self.after


def _target_text(value: Any, index: int) -> str:
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"request {index}: 'target_new' must be a non-empty string (or {{'str': ...}}), got {value!r}")
    return value if value.startswith(" ") else " " + value


def prepare_requests(requests: Sequence[Mapping[str, Any]]) -> list[EditRequest]:
    """Validate EasyEdit request dicts (``prompt``, ``target_new``, ``subject``) into :class:`EditRequest`.

    The subject is located by a ``{}`` placeholder in the prompt or, failing that, by its last
    occurrence (a subject appearing twice gets a warning, see spec A23).
    """
    if isinstance(requests, Mapping) or not isinstance(requests, Sequence) or not requests:
        raise ValueError("requests must be a non-empty list of dicts with 'prompt', 'target_new' and 'subject'")
    prepared = []
    for index, request in enumerate(requests):
        if not isinstance(request, Mapping):
            raise ValueError(f"request {index} must be a dict, got {type(request).__name__}")
        prompt, subject = request.get("prompt"), request.get("subject")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"request {index}: 'prompt' must be a non-empty string, got {prompt!r}")
        if not isinstance(subject, str) or not subject.strip():
            raise ValueError(
                f"request {index}: COMEBA-HK/MEMIT-C need the 'subject' of each request (keys are read at its last token); "
                "pass subject=[...] to EasyEdit's edit()/batch_edit() or add 'subject' to the request"
            )
        target = _target_text(request.get("target_new"), index)
        if prompt.count("{}") > 1:
            raise ValueError(f"request {index}: prompt {prompt!r} has {prompt.count('{}')} '{{}}' placeholders; write one "
                             "where the subject goes, or none (the subject is then found in the text)")
        if prompt.count("{}") == 1:
            before, after = prompt.split("{}")
        else:
            at = prompt.rfind(subject)
            if at < 0:
                raise ValueError(f"request {index}: subject {subject!r} does not occur in prompt {prompt!r}; "
                                 "fix the subject or write the prompt with a '{}' placeholder")
            if prompt.count(subject) > 1:
                warnings.warn(f"request {index}: subject {subject!r} occurs more than once in {prompt!r}; "
                              "editing at its last occurrence", stacklevel=2)
            before, after = prompt[:at], prompt[at + len(subject):]
        prepared.append(EditRequest(before=before, subject=subject, after=after, target_new=target))
    return prepared


class TokenView:
    """Encodes text as ``leading special ids + plain ids`` and pads on the right, without touching ``tok``."""

    def __init__(self, tok: Any) -> None:
        with_special = list(tok("a")["input_ids"])
        plain = list(tok("a", add_special_tokens=False)["input_ids"])
        if not plain or plain[0] not in with_special:
            raise ValueError(f"cannot tell which special tokens {type(tok).__name__} adds before text")
        self.tok = tok
        self.leading: list[int] = with_special[: with_special.index(plain[0])]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id: int = int(pad) if pad is not None else 0

    @property
    def bos_id(self) -> int | None:
        """The id the tokenizer puts before every text (its BOS), if any."""
        return self.leading[0] if self.leading else None

    def encode(self, text: str) -> list[int]:
        return self.leading + list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_target(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if ids and ids[0] in self.leading:
            ids = ids[1:]
        if not ids:
            raise ValueError(f"target {text!r} encodes to no tokens")
        return ids

    def subject_last_index(self, text_through_subject: str) -> int:
        """Index of the subject's last token in ``encode(text)`` when ``text`` starts with these characters."""
        return len(self.encode(text_through_subject)) - 1

    def right_pad(self, seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` right-padded, so token indices count from the left."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids.to(device), mask.to(device)


def split_template(template: str) -> tuple[str, str]:
    """``"Some text. {}"`` -> (``"Some text. "``, ``""``): the text around the prompt slot."""
    if template.count("{}") != 1:
        raise ValueError(f"context template {template!r} must contain exactly one '{{}}'")
    before, after = template.split("{}")
    return before, after


def template_weights(groups: Sequence[Sequence[str]]) -> list[float]:
    """MEMIT's averaging: mean within each group, then mean of the group means (bare prompt: 1/2)."""
    return [1.0 / (len(groups) * len(group)) for group in groups for _ in group]


@torch.no_grad()
def generate_context_templates(model: nn.Module, tok: Any, length_params: Sequence[Sequence[int]],
                               seed: int, device: torch.device) -> list[list[str]]:
    """MEMIT's context templates: ``[["{}"], [sampled prefix + ". {}", ...], ...]``.

    Each group ``[length, count]`` samples ``count`` continuations (top-5, from the seed words in
    turn) of ``length`` tokens from the model itself, with a local generator seeded by ``seed``.
    Continuations whose seed words have the same token length are sampled as one batch.
    """
    from .modules import base_model, final_logit_softcap

    view = TokenView(tok)
    generator = torch.Generator().manual_seed(int(seed))
    head = model.get_output_embeddings()
    softcap = final_logit_softcap(model)
    groups: list[list[str]] = [["{}"]]
    for length, count in length_params:
        starts = [view.encode(TEMPLATE_SEEDS[i % len(TEMPLATE_SEEDS)]) for i in range(count)]
        finished: dict[int, list[int]] = {}
        for width in sorted({len(s) for s in starts}):
            rows = [i for i, s in enumerate(starts) if len(s) == width]
            ids = torch.tensor([starts[i] for i in rows], device=device)
            while ids.shape[1] - len(view.leading) < length:
                hidden = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
                logits = head(hidden).float().cpu()
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                top = torch.topk(logits, TEMPLATE_TOP_K, dim=-1)
                pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
                ids = torch.cat([ids, top.indices.gather(1, pick).to(device)], dim=1)
            finished.update({i: ids[j].tolist() for j, i in enumerate(rows)})
        group = []
        for i in range(count):
            text = tok.decode(finished[i][len(view.leading):], skip_special_tokens=True)
            group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups
