"""EasyEdit's request forms of :class:`~smedit_plugin.records.EditRecord`: ``BaseEditor`` keyword arguments and
the request dicts an apply function receives."""
from __future__ import annotations

from typing import Any, Union

from .records import EditRecord

LOCALITY_KEY = "neighborhood"
#: EasyEdit's key for one-hop portability questions (its ``edit.py`` passes ZsRE's ``New Question`` under it).
PORTABILITY_KEY = "one_hop"


def _one_or_list(values: tuple[str, ...]) -> Union[str, list[str], None]:
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _probe_inputs(prompts: list[tuple[str, ...]], answers: list[tuple[str, ...]]) -> dict[str, list]:
    """EasyEdit's per-record ``{"prompt": [...], "ground_truth": [...]}`` (a string, a list, or None per record)."""
    return {"prompt": [_one_or_list(p) for p in prompts], "ground_truth": [_one_or_list(a) for a in answers]}


def to_edit_kwargs(records: list[EditRecord], locality_key: str = LOCALITY_KEY,
                   portability_key: str = PORTABILITY_KEY) -> dict[str, Any]:
    """Keyword arguments for ``BaseEditor.edit``/``batch_edit`` (always call EasyEdit with keywords).

    ``rephrase_prompts`` carries each record's first rephrase; ``locality_inputs`` one entry per
    record under ``locality_key`` and ``portability_inputs`` under ``portability_key`` (a string,
    or a list when a record has several prompts; None for a record without, which EasyEdit's
    current source skips); ``subject`` only when every record has one. EasyEdit has no field for
    ``portability_old_answers``.
    """
    if not records:
        raise ValueError("records is empty; pass at least one EditRecord")
    for index, record in enumerate(records):
        if not isinstance(record, EditRecord):
            raise ValueError(f"records[{index}] is a {type(record).__name__}, not an EditRecord")
    kwargs: dict[str, Any] = {
        "prompts": [r.prompt for r in records],
        "target_new": [r.target_new for r in records],
        "ground_truth": [r.ground_truth for r in records],
    }
    if any(r.rephrase_prompts for r in records):
        kwargs["rephrase_prompts"] = [r.rephrase_prompts[0] if r.rephrase_prompts else None for r in records]
    if any(r.locality_prompts for r in records):
        kwargs["locality_inputs"] = {locality_key: _probe_inputs([r.locality_prompts for r in records],
                                                                 [r.locality_answers for r in records])}
    if any(r.portability_prompts for r in records):
        kwargs["portability_inputs"] = {portability_key: _probe_inputs([r.portability_prompts for r in records],
                                                                       [r.portability_answers for r in records])}
    if all(r.subject is not None for r in records):
        for index, record in enumerate(records):
            if record.subject not in record.prompt:
                raise ValueError(f"records[{index}].subject {record.subject!r} does not occur in its prompt; EasyEdit asserts it does")
        kwargs["subject"] = [r.subject for r in records]
    return kwargs


def to_requests(records: list[EditRecord], locality_key: str = LOCALITY_KEY,
                portability_key: str = PORTABILITY_KEY) -> list[dict[str, Any]]:
    """The request dicts EasyEdit's ``_prepare_requests`` builds from :func:`to_edit_kwargs`, same keys and order.

    Use them to call an apply function directly, the way ``BaseEditor`` would.
    """
    kwargs = to_edit_kwargs(records, locality_key, portability_key)
    requests = [
        {"prompt": prompt, "target_new": target, "ground_truth": truth, "portability": {}, "locality": {}}
        for prompt, truth, target in zip(kwargs["prompts"], kwargs["ground_truth"], kwargs["target_new"])
    ]
    for request, subject in zip(requests, kwargs.get("subject", ())):
        request["subject"] = subject
    for request, rephrase in zip(requests, kwargs.get("rephrase_prompts", ())):
        request["rephrase_prompt"] = rephrase
    for section in ("locality", "portability"):
        for key, inputs in kwargs.get(f"{section}_inputs", {}).items():
            for request, prompt, truth in zip(requests, inputs["prompt"], inputs["ground_truth"]):
                if prompt is not None:
                    request[section][key] = {"prompt": prompt, "ground_truth": truth}
    return requests
