"""Edit records: one type for ZsRE and CounterFact, and loaders for their file schemas.

Loaders read the MEND/ROME ZsRE schema, the full ROME CounterFact schema and the MEND/EasyEdit
CounterFact split schema (the README's Data section lists them) into :class:`EditRecord`, and
raise ``ValueError`` naming the file, the record index and the field for malformed input.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from .shipped import RESOURCES_DIR

PathLike = Union[str, os.PathLike]
DATASETS = ("zsre", "counterfact")
NQ_PREFIX = "nq question: "
#: The portability object of EasyEdit's one-hop ZsRE/CounterFact files; ``Old Answer`` is optional (our addition).
PORTABILITY_FIELDS = ("New Question", "New Answer")
PORTABILITY_OLD_ANSWER = "Old Answer"


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One requested edit with its generalisation (rephrase), locality and portability probes.

    For CounterFact ``ground_truth`` is the true object (``target_true``); each locality prompt
    has its own answer in ``locality_answers`` (the true object again for CounterFact). Each
    portability prompt is a question whose answer follows from the edit (one hop away:
    ``portability_answers``); ``portability_old_answers``, when given, is its answer before the
    edit, which probability scoring needs for its ``P(new) > P(old)`` comparison.
    """

    prompt: str
    target_new: str
    ground_truth: Optional[str] = None
    subject: Optional[str] = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    case_id: Union[int, str, None] = None
    portability_prompts: tuple[str, ...] = ()
    portability_answers: tuple[str, ...] = ()
    portability_old_answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"EditRecord.{name} must be a non-empty string, got {value!r}")
        for name in ("ground_truth", "subject"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"EditRecord.{name} must be a string or None, got {value!r}")
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers", "portability_prompts",
                     "portability_answers", "portability_old_answers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"EditRecord.{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if len(self.locality_prompts) != len(self.locality_answers):
            raise ValueError(
                f"EditRecord has {len(self.locality_prompts)} locality_prompts but "
                f"{len(self.locality_answers)} locality_answers; give one answer per prompt"
            )
        if len(self.portability_prompts) != len(self.portability_answers):
            raise ValueError(
                f"EditRecord has {len(self.portability_prompts)} portability_prompts but "
                f"{len(self.portability_answers)} portability_answers; give one answer per prompt"
            )
        if self.portability_old_answers and len(self.portability_old_answers) != len(self.portability_prompts):
            raise ValueError(
                f"EditRecord has {len(self.portability_old_answers)} portability_old_answers for "
                f"{len(self.portability_prompts)} portability_prompts; give one per prompt or none"
            )

    @property
    def target_true(self) -> Optional[str]:
        """CounterFact's name for :attr:`ground_truth`."""
        return self.ground_truth


# --------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------

def _read_json_list(path: PathLike) -> tuple[Path, list]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return p, data


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


class _Fields:
    """Typed field access on one raw record, with errors that name file, record and field."""

    def __init__(self, path: Path, index: int, record: Any) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} must be a JSON object, got {type(record).__name__}")
        self.path, self.index, self.record = path, index, record

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}: record {self.index}: field {field!r} {problem}")

    def get(self, field: str) -> Any:
        if field not in self.record:
            raise self.error(field, "is missing")
        return self.record[field]

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "is empty")
        return value

    def texts(self, field: str) -> tuple[str, ...]:
        """A string or a list of strings (EasyEdit files use both)."""
        value = self.get(field)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
            raise self.error(field, "must be a non-empty string or a list of non-empty strings")
        return tuple(items)

    def case_id(self) -> Union[int, str]:
        value = self.record.get("case_id", self.index)
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise self.error("case_id", f"must be an int or a string, got {value!r}")
        return value


def _check_subject(fields: _Fields, subject: str, prompt: str, prompt_field: str) -> None:
    if subject not in prompt:
        raise fields.error("subject", f"({subject!r}) does not occur in the {prompt_field} ({prompt!r})")


def _portability(fields: _Fields) -> dict[str, tuple[str, ...]]:
    """The record's optional one-hop question (``portability: {"New Question", "New Answer"[, "Old Answer"]}``).

    Returned as :class:`EditRecord` keyword arguments; empty when the record has no ``portability``.
    """
    raw = fields.record.get("portability")
    if raw is None:
        return {}
    schema = ", ".join(repr(f) for f in PORTABILITY_FIELDS)
    if not isinstance(raw, dict):
        raise fields.error("portability", f"must be an object with {schema} (EasyEdit's one-hop schema)")

    def text(name: str) -> str:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise fields.error(f"portability.{name}",
                               f"must be a non-empty string (EasyEdit's one-hop schema: {schema})")
        return value

    question, answer = (text(name) for name in PORTABILITY_FIELDS)
    old = (text(PORTABILITY_OLD_ANSWER),) if PORTABILITY_OLD_ANSWER in raw else ()
    return {"portability_prompts": (question,), "portability_answers": (answer,), "portability_old_answers": old}


# --------------------------------------------------------------------------------------------
# ZsRE
# --------------------------------------------------------------------------------------------

def zsre_locality_prompt(loc: str, keep_nq_prefix: bool = False) -> str:
    """The unrelated NQ question as a prompt: without the ``"nq question: "`` tag, ending in ``"?"``.

    ``keep_nq_prefix=True`` keeps the tag, as the MALMEN/RLEdit/SMEdit reference code does.
    """
    question = loc if keep_nq_prefix or not loc.startswith(NQ_PREFIX) else loc[len(NQ_PREFIX):]
    return question if question.rstrip().endswith("?") else question + "?"


def load_zsre(path: PathLike, limit: Optional[int] = None, *, keep_nq_prefix: bool = False) -> list[EditRecord]:
    """ZsRE in the MEND/ROME schema (``src, rephrase, alt, answers, loc, loc_ans, subject``).

    Records with an empty ``alt`` are skipped (as EasyEdit's ``ZsreDataset`` does); ``case_id`` is
    the record's index in the file. ``limit`` caps the number of records returned.
    """
    _check_limit(limit)
    p, data = _read_json_list(path)
    records: list[EditRecord] = []
    for index, raw in enumerate(data):
        if limit is not None and len(records) >= limit:
            break
        fields = _Fields(p, index, raw)
        target_new = fields.text("alt", allow_empty=True)
        if not target_new.strip():
            continue
        prompt = fields.text("src")
        answers = fields.get("answers")
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise fields.error("answers", "must be a non-empty list whose first item is the original answer")
        subject = fields.text("subject")
        _check_subject(fields, subject, prompt, "src")
        records.append(EditRecord(
            prompt=prompt,
            target_new=target_new,
            ground_truth=answers[0],
            subject=subject,
            rephrase_prompts=fields.texts("rephrase"),
            locality_prompts=(zsre_locality_prompt(fields.text("loc"), keep_nq_prefix),),
            locality_answers=(fields.text("loc_ans"),),
            case_id=index,
            **_portability(fields),
        ))
    return records


# --------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------

def _counterfact_rome(fields: _Fields) -> EditRecord:
    rewrite = fields.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise fields.error("requested_rewrite", "must be an object")
    sub = _Fields(fields.path, fields.index, rewrite)
    template = sub.text("prompt")
    subject = sub.text("subject")
    if "{}" not in template:
        raise fields.error("requested_rewrite.prompt", f"({template!r}) has no '{{}}' placeholder for the subject")
    targets = {}
    for name in ("target_new", "target_true"):
        value = rewrite.get(name)
        if not isinstance(value, dict) or not isinstance(value.get("str"), str) or not value["str"].strip():
            raise fields.error(f"requested_rewrite.{name}", "must be an object with a non-empty 'str'")
        targets[name] = value["str"]
    neighbours = fields.texts("neighborhood_prompts")
    return EditRecord(
        prompt=template.replace("{}", subject, 1),
        target_new=targets["target_new"],
        ground_truth=targets["target_true"],
        subject=subject,
        rephrase_prompts=fields.texts("paraphrase_prompts"),
        locality_prompts=neighbours,
        locality_answers=(targets["target_true"],) * len(neighbours),
        case_id=fields.case_id(),
        **_portability(fields),
    )


def _counterfact_split(fields: _Fields) -> EditRecord:
    prompt = fields.text("prompt")
    subject = fields.text("subject")
    _check_subject(fields, subject, prompt, "prompt")
    locality_prompts = fields.texts("locality_prompt")
    locality_answers = fields.texts("locality_ground_truth")
    if len(locality_answers) == 1 and len(locality_prompts) > 1:
        locality_answers = locality_answers * len(locality_prompts)
    if len(locality_answers) != len(locality_prompts):
        raise fields.error("locality_ground_truth", f"has {len(locality_answers)} answers for {len(locality_prompts)} locality prompts")
    return EditRecord(
        prompt=prompt,
        target_new=fields.text("target_new"),
        ground_truth=fields.text("ground_truth"),
        subject=subject,
        rephrase_prompts=fields.texts("rephrase_prompt"),
        locality_prompts=locality_prompts,
        locality_answers=locality_answers,
        case_id=fields.case_id(),
        **_portability(fields),
    )


def counterfact_schema(record: Any) -> str:
    """``"rome"`` (``requested_rewrite`` ...) or ``"split"`` (MEND/EasyEdit ``prompt, target_new`` ...)."""
    if isinstance(record, dict) and "requested_rewrite" in record:
        return "rome"
    if isinstance(record, dict) and "prompt" in record and "target_new" in record:
        return "split"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"not a CounterFact record (fields {keys}); expected 'requested_rewrite' or 'prompt'+'target_new'")


def load_counterfact(path: PathLike, limit: Optional[int] = None) -> list[EditRecord]:
    """CounterFact in the full ROME schema or the MEND/EasyEdit split schema (detected from record 0).

    ROME: prompt = template with the subject, rephrases = paraphrase prompts, locality =
    neighbourhood prompts answered by the true object. Split: one rephrase and one locality prompt.
    """
    _check_limit(limit)
    p, data = _read_json_list(path)
    if not data:
        raise ValueError(f"{p}: the file holds no records")
    try:
        schema = counterfact_schema(data[0])
    except ValueError as exc:
        raise ValueError(f"{p}: record 0: {exc}") from None
    parse = _counterfact_rome if schema == "rome" else _counterfact_split
    rows = data if limit is None else data[:limit]
    return [parse(_Fields(p, index, raw)) for index, raw in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# Any file
# --------------------------------------------------------------------------------------------

def detect_dataset(path: PathLike) -> str:
    """``"zsre"`` or ``"counterfact"`` from the fields of a file's first record."""
    p, data = _read_json_list(path)
    if not data:
        raise ValueError(f"{p}: the file holds no records")
    first = data[0]
    if isinstance(first, dict) and "src" in first and "alt" in first:
        return "zsre"
    try:
        counterfact_schema(first)
    except ValueError:
        fields = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(
            f"{p}: cannot tell the dataset from record 0 (fields {fields}); expected ZsRE "
            "('src', 'alt', ...) or CounterFact ('requested_rewrite' or 'prompt'+'target_new'); pass dataset="
        ) from None
    return "counterfact"


def load_records(path: PathLike, dataset: Optional[str] = None, limit: Optional[int] = None) -> list[EditRecord]:
    """Load ZsRE or CounterFact records; ``dataset=None`` detects it from the file."""
    if dataset is None:
        dataset = detect_dataset(path)
    if dataset == "zsre":
        return load_zsre(path, limit)
    if dataset == "counterfact":
        return load_counterfact(path, limit)
    raise ValueError(f"unknown dataset {dataset!r}; use one of {list(DATASETS)} or None to detect it")


def sample_path(name: str) -> Path:
    """Path of a data file shipped in the package (``zsre_sample`` or ``zsre_sample_eval``, ``.json`` optional)."""
    folder = RESOURCES_DIR
    filename = name if name.endswith(".json") else f"{name}.json"
    path = folder / filename
    if not path.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.json"))
        raise FileNotFoundError(f"no packaged sample {name!r}; available: {shipped}")
    return path
