"""General capability after editing: zero-shot GLUE-style accuracy and perplexity (meta-editing spec §5, "GLUE probe").

Perplexity itself lives in :mod:`smedit_plugin.perplexity`; this module holds the GLUE-style tasks,
their scoring and :func:`general_report`, which runs both.

The SMEdit and RLEdit papers check that editing leaves the rest of the model intact by scoring SST-2,
MRPC, CoLA, RTE, NLI and MMLU (100 test items each, zero-shot) and perplexity on plain text, before and
after N sequential edits. Each task keeps the reference code's prompt framing (``xpq-tech/emsedit``,
``glue_eval/``) and its probability scoring: a candidate answer's score is the mean log-probability of
its tokens after the prompt, and the item is right when the gold candidate scores highest.

Two choices differ from the reference on purpose:

* RTE follows the GLUE convention of the data (label 0 = entailment, 1 = not entailment; e.g. "The
  Dalai Lama has been living in exile since 10,000." is label 1). The reference reads label 1 as
  "True", which scores the model against the inverted answer.
* Items are a seeded, label-balanced sample (so a model that always answers the same way scores
  1 / number of labels), not the first N after ten reserved few-shot records.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .devices import model_input_device
from .answers import accepts_logits_to_keep, eval_mode
from .perplexity import special_prefix, read_text_tokens, token_perplexity
from .shipped import GLUE_DIR
from .text import chunks, pad_token_id, tokenize_pair

GLUE_TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
GLUE_DIR_ENV = "SMEDIT_GLUE_DIR"
PADDING_SIDES = ("left", "right")

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class GlueItem:
    """One zero-shot test item: the prompt, the candidate answers (appended after a space), the gold index."""

    prompt: str
    choices: tuple[str, ...]
    label: int


# --------------------------------------------------------------------------------------------
# Task framing (the reference's zero-shot prompts)
# --------------------------------------------------------------------------------------------

def _sst2(record: dict[str, Any]) -> GlueItem:
    return GlueItem(f"Review : {record['sentence'].strip()}\nSentiment :", ("negative", "positive"),
                    int(record["label"]))


def _mrpc(record: dict[str, Any]) -> GlueItem:
    prompt = (f"Are the sentences paraphrases of each other.\nSentence 1: {record['sentence1'].strip()}\n"
              f"Sentence 2: {record['sentence2'].strip()}\nAnswer:")
    return GlueItem(prompt, ("No", "Yes"), int(record["label"]))


def _cola(record: dict[str, Any]) -> GlueItem:
    prompt = f"Is this sentence linguistically acceptable?\nSentence: {record['sentence'].strip()}\nAnswer:"
    return GlueItem(prompt, ("No", "Yes"), int(record["label"]))


def _rte(record: dict[str, Any]) -> GlueItem:
    prompt = f"{record['sentence1'].strip()}\nquestion: {record['sentence2'].strip()} True or False?\nanswer:"
    return GlueItem(prompt, ("True", "False"), int(record["label"]))


def _nli(record: dict[str, Any]) -> GlueItem:
    prompt = f"{record['sentence1'].strip()} entails the {record['sentence2'].strip()} True or False? Answer:"
    return GlueItem(prompt, ("True", "False"), ("entailment", "not_entailment").index(record["label"]))


def _mmlu(record: dict[str, Any]) -> GlueItem:
    options = "".join(f"({letter}) {choice}\n" for letter, choice in zip("ABCD", record["choices"]))
    return GlueItem(f"Question: {record['question'].strip()}\n{options}Answer:", ("A", "B", "C", "D"),
                    int(record["answer"]))


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
    fields: tuple[str, ...]
    label_field: str
    labels: tuple[Any, ...]
    build: Callable[[dict[str, Any]], GlueItem]


_TASKS: dict[str, _TaskSpec] = {
    "sst2": _TaskSpec(("sentence",), "label", (0, 1), _sst2),
    "mrpc": _TaskSpec(("sentence1", "sentence2"), "label", (0, 1), _mrpc),
    "cola": _TaskSpec(("sentence",), "label", (0, 1), _cola),
    "rte": _TaskSpec(("sentence1", "sentence2"), "label", (0, 1), _rte),
    "nli": _TaskSpec(("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), _nli),
    "mmlu": _TaskSpec(("question", "choices"), "answer", (0, 1, 2, 3), _mmlu),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def default_glue_dir() -> Path:
    """``$SMEDIT_GLUE_DIR``, else the GLUE-style subsets packaged in ``smedit_plugin/resources/glue``."""
    root = os.environ.get(GLUE_DIR_ENV)
    return Path(root).expanduser() if root else GLUE_DIR


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; use one of {list(GLUE_TASKS)}")


def _check_record(task: str, index: int, record: Any) -> None:
    spec = _TASKS[task]
    if not isinstance(record, dict):
        raise ValueError(f"{task}.json record {index} is a {type(record).__name__}, not an object")
    for field in spec.fields + (spec.label_field,):
        if field not in record:
            raise ValueError(f"{task}.json record {index} has no {field!r} field (needs {list(spec.fields)} "
                             f"and {spec.label_field!r})")
    if record[spec.label_field] not in spec.labels:
        raise ValueError(f"{task}.json record {index}: {spec.label_field}={record[spec.label_field]!r} is not one of "
                         f"{list(spec.labels)}")
    if task == "mmlu" and (not isinstance(record["choices"], list) or len(record["choices"]) != 4):
        raise ValueError(f"mmlu.json record {index}: 'choices' must be a list of 4 options")


def _balanced_indices(labels: Sequence[Any], n_items: int, seed: int) -> list[int]:
    """``n_items`` indices, as equal per label as the data allows, seeded; returned in file order."""
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    pools = [groups[label] for label in sorted(groups, key=str)]
    for pool in pools:
        rng.shuffle(pool)
    chosen: list[int] = []
    while len(chosen) < n_items:
        for pool in pools:
            if pool and len(chosen) < n_items:
                chosen.append(pool.pop())
    return sorted(chosen)


def load_glue_task(
    task: str, n_items: Optional[int] = 100, *, data_dir: Optional[PathLike] = None, seed: int = 0
) -> list[GlueItem]:
    """Zero-shot items of ``task`` read from ``<data_dir>/<task>.json``.

    ``n_items`` records are taken label-balanced with a fixed ``seed`` (the same call always gives
    the same items); ``None`` takes every record. Raises FileNotFoundError naming the task and how
    to point at the folder, ValueError naming the record and field of a malformed record.
    """
    _check_task(task)
    if n_items is not None and (isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1):
        raise ValueError(f"n_items must be a positive int or None (all records), got {n_items!r}")
    folder = Path(data_dir).expanduser() if data_dir is not None else default_glue_dir()
    path = folder / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE task {task!r}: {path} not found; pass data_dir=<folder with {task}.json> or set "
            f"${GLUE_DIR_ENV} (the package ships them in smedit_plugin/resources/glue)")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records")
    for index, record in enumerate(records):
        _check_record(task, index, record)
    if n_items is None:
        n_items = len(records)
    if n_items > len(records):
        raise ValueError(f"n_items={n_items} but {path} has only {len(records)} records; ask for at most that")
    label_field = _TASKS[task].label_field
    indices = _balanced_indices([record[label_field] for record in records], n_items, seed)
    return [_TASKS[task].build(records[i]) for i in indices]


# --------------------------------------------------------------------------------------------
# Candidate scoring
# --------------------------------------------------------------------------------------------

def _forward_logits(
    model: nn.Module, rows: Sequence[Sequence[int]], wanted: Sequence[Sequence[int]], pad_id: int, padding_side: str
) -> list[torch.Tensor]:
    """Logits ``[len(wanted[r]), vocab]`` at the given positions of every row, from one padded forward.

    Position ids follow the attention mask, so a left-padded row sees the same positions as alone.
    Only the positions some row needs are projected when the model accepts ``logits_to_keep``.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = [width - len(row) if padding_side == "left" else 0 for row in rows]
    for r, (row, offset) in enumerate(zip(rows, offsets)):
        input_ids[r, offset: offset + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, offset: offset + len(row)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    device = model_input_device(model)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": position_ids.to(device), "use_cache": False}
    padded = [[offset + p for p in positions] for offset, positions in zip(offsets, wanted)]
    if accepts_logits_to_keep(model):
        keep = sorted({p for positions in padded for p in positions})
        # on the CPU: an index tensor there may index the last layer's output on any GPU of a device_map
        logits = model(**inputs, logits_to_keep=torch.tensor(keep)).logits
        if logits.shape[1] != len(keep):
            raise RuntimeError(f"{type(model).__name__} ignored logits_to_keep (got {logits.shape[1]} positions, "
                               f"expected {len(keep)})")
        column = {p: c for c, p in enumerate(keep)}
        padded = [[column[p] for p in positions] for positions in padded]
    else:
        logits = model(**inputs).logits
    return [logits[r, positions] for r, positions in enumerate(padded)]


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    padding_side: Optional[str] = None,
    bar: Optional[tqdm] = None,
) -> list[list[float]]:
    """Mean per-token log-probability of each candidate continuation after its prompt, computed in fp32.

    A candidate is tokenised on its own (with a leading space) and appended to the prompt's ids, so
    every candidate is scored against the same prefix. Rows are ``prompt + candidate[:-1]``; equal
    rows are run once, so single-token candidates of one prompt share a single row. Rows are padded
    on ``padding_side`` (default: the tokenizer's) and run ``batch_size`` rows per forward.
    """
    if isinstance(prompts, str) or len(prompts) != len(choices) or not prompts:
        raise ValueError(f"prompts and choices must be equal-length non-empty lists, got {len(prompts)} prompts "
                         f"and {len(choices)} choice lists")
    side = padding_side if padding_side is not None else getattr(tokenizer, "padding_side", "right")
    if side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {list(PADDING_SIDES)}, got {side!r}")
    row_index: dict[tuple[int, ...], int] = {}
    targets: list[list[tuple[int, int, list[int]]]] = []
    for i, (prompt, options) in enumerate(zip(prompts, choices)):
        if isinstance(options, str) or len(options) < 2:
            raise ValueError(f"choices[{i}] must list at least two candidate answers, got {options!r}")
        item_targets = []
        for option in options:
            prompt_ids, answer_ids = tokenize_pair(tokenizer, prompt, option)
            if not prompt_ids or not answer_ids:
                raise ValueError(f"item {i}: prompt or candidate {option!r} tokenises to nothing")
            row = tuple(prompt_ids + answer_ids[:-1])
            item_targets.append((row_index.setdefault(row, len(row_index)), len(prompt_ids) - 1, answer_ids))
        targets.append(item_targets)
    rows = list(row_index)
    wanted: list[set[tuple[int, int]]] = [set() for _ in rows]
    for item_targets in targets:
        for row, start, answer_ids in item_targets:
            wanted[row].update((start + j, token) for j, token in enumerate(answer_ids))
    logprob: dict[tuple[int, int, int], float] = {}
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    if bar is not None:
        bar.reset(total=len(rows))
    with torch.no_grad(), eval_mode(model):
        for part in chunks(order, batch_size):
            positions = [sorted({position for position, _ in wanted[r]}) for r in part]
            logits = _forward_logits(model, [rows[r] for r in part], positions, pad_token_id(tokenizer), side)
            for r, row_positions, row_logits in zip(part, positions, logits):
                row_logp = torch.log_softmax(row_logits.float(), dim=-1)
                column = {position: c for c, position in enumerate(row_positions)}
                for position, token in wanted[r]:
                    logprob[r, position, token] = float(row_logp[column[position], token])
            if bar is not None:
                bar.update(len(part))
    return [[sum(logprob[row, start + j, token] for j, token in enumerate(answer_ids)) / len(answer_ids)
             for row, start, answer_ids in item_targets] for item_targets in targets]


def glue_accuracy(
    model: nn.Module, tokenizer: Any, items: Sequence[GlueItem], *, batch_size: int = 16, bar: Optional[tqdm] = None
) -> float:
    """Fraction of items whose gold candidate has the highest mean log-probability (first one wins a tie)."""
    scores = score_choices(model, tokenizer, [item.prompt for item in items], [item.choices for item in items],
                           batch_size=batch_size, bar=bar)
    hits = [max(range(len(row)), key=row.__getitem__) == item.label for row, item in zip(scores, items)]
    return sum(hits) / len(hits)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def general_report(
    model: nn.Module,
    tokenizer: Any,
    tasks: Iterable[str] = GLUE_TASKS,
    n_items: Optional[int] = 100,
    ppl_tokens: Optional[int] = 4096,
    progress: bool = False,
    *,
    data_dir: Optional[PathLike] = None,
    text_path: Optional[PathLike] = None,
    window: int = 512,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero-shot accuracy per GLUE task and perplexity, the papers' general-capability check.

    Returns ``{"glue": {task: accuracy}, "perplexity": float or None, "n_items": {task: items scored},
    "ppl_tokens": tokens read or None, "seconds": wall time}``. ``ppl_tokens=None`` skips perplexity,
    ``tasks=()`` skips GLUE. Every task file is loaded (and checked) before the model runs.
    """
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names such as ('sst2',), not the string {tasks!r}")
    task_list = list(tasks)
    for task in task_list:
        _check_task(task)
    start = time.perf_counter()
    items = {task: load_glue_task(task, n_items, data_dir=data_dir, seed=seed) for task in task_list}
    ids = read_text_tokens(tokenizer, text_path, ppl_tokens) if ppl_tokens is not None else None
    glue: dict[str, float] = {}
    for task, task_items in items.items():
        with tqdm(desc=f"GLUE {task}", unit="row", disable=not progress) as bar:
            glue[task] = glue_accuracy(model, tokenizer, task_items, batch_size=batch_size, bar=bar)
    ppl = None
    if ids is not None:
        with tqdm(desc="perplexity", unit="window", disable=not progress) as bar:
            ppl = token_perplexity(model, ids, window=window, prefix_ids=special_prefix(tokenizer), bar=bar)
    return {"glue": glue, "perplexity": ppl, "n_items": {task: len(v) for task, v in items.items()},
            "ppl_tokens": None if ids is None else len(ids), "seconds": time.perf_counter() - start}
