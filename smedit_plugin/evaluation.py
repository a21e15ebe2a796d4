"""Teacher-forced editing metrics: efficacy, generalization, specificity and portability (meta-editing spec §2.3, §5).

ZsRE style: per example, the fraction of answer tokens whose arg-max prediction is the answer
token (teacher forcing), averaged over examples. Specificity (locality) has two modes:
``"gold"`` scores the unrelated question against its dataset answer (the SMEdit paper's LS,
bounded by the unedited model's own accuracy) and ``"agreement"`` counts the answer positions
where the edited model's arg-max equals the unedited model's (EasyEdit / COMEBA-HK style; capture
the reference with :func:`predict_locality_reference` before editing).

CounterFact style (ROME, SMEdit appendix): a prompt is a success when the mean per-token
log-probability of one target beats the other's: new over true for edit prompts (efficacy) and
paraphrases (generalization), true over new for neighbourhood prompts (specificity).

Portability (EasyEdit's one-hop metric, PS) is scored like efficacy on the record's portability
questions: the token accuracy of the portability answer, or under probability scoring
``P(new answer) > P(old answer)`` for the questions that carry an old answer. A record without
portability questions (or, under probability scoring, without old answers) has None, never 0.

Every prompt set of a record (its rephrases, its locality prompts) is averaged within the record
first, then over records, so a record with ten neighbours weighs as much as one with one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from .answers import answer_labels, answer_logits, eval_mode
from .records import DATASETS, EditRecord
from .text import iter_micro_batches, label_lengths

LOCALITY_MODES = ("gold", "agreement")
#: ``accuracy``: teacher-forced token accuracy (ZsRE; EasyEdit and COMEBA-HK on every dataset);
#: ``probability``: new-vs-old log-probability comparisons (CounterFact in ROME / the SMEdit appendix).
SCORING = ("auto", "accuracy", "probability")
METRICS = ("efficacy", "generalization", "specificity", "portability")


@dataclasses.dataclass(frozen=True)
class ScoredAnswer:
    """Teacher-forced predictions for one (prompt, answer) pair, one entry per answer token."""

    target: torch.Tensor
    argmax: torch.Tensor
    logprob: torch.Tensor

    @property
    def accuracy(self) -> float:
        return token_accuracy(self.argmax, self.target)

    @property
    def mean_logprob(self) -> float:
        return float(self.logprob.mean())


def token_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of positions where the prediction equals the target (one example)."""
    if predicted.shape != target.shape or predicted.numel() == 0:
        raise ValueError(f"predicted and target must be equal-length and non-empty, got {tuple(predicted.shape)} "
                         f"and {tuple(target.shape)}")
    return float((predicted == target).float().mean())


def score_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    bar: Optional[tqdm] = None,
) -> list[ScoredAnswer]:
    """Arg-max and log-probability of every answer token given prompt + answer prefix, in fp32.

    Pairs are batched in order of length (less padding) and returned in input order; logits are
    only computed at answer positions.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    batches = iter_micro_batches(tokenizer, [prompts[i] for i in order], [answers[i] for i in order], batch_size)
    scored: list[Optional[ScoredAnswer]] = [None] * len(order)
    with torch.no_grad(), eval_mode(model):
        for indices, batch in batches:
            logits = answer_logits(model, batch).float()
            targets = answer_labels(batch).to(logits.device)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            argmax = logits.argmax(dim=-1)
            rows = zip(*(t.cpu().split(label_lengths(batch)) for t in (targets, argmax, logprobs)))
            for position, (target, pred, logprob) in zip(indices, rows):
                scored[order[position]] = ScoredAnswer(target=target, argmax=pred, logprob=logprob)
            if bar is not None:
                bar.update(len(indices))
    return cast(list[ScoredAnswer], scored)


# --------------------------------------------------------------------------------------------
# Query planning: every (prompt, answer) pair the metrics need, scored in one batched pass
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Queries:
    prompts: list[str] = dataclasses.field(default_factory=list)
    answers: list[str] = dataclasses.field(default_factory=list)

    def add(self, prompt: str, answer: str) -> int:
        self.prompts.append(prompt)
        self.answers.append(answer)
        return len(self.prompts) - 1


def _check_inputs(records: Sequence[EditRecord], dataset: str, locality: str, reference: Any, batch_size: int) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if locality not in LOCALITY_MODES:
        raise ValueError(f"locality must be one of {list(LOCALITY_MODES)}, got {locality!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(records, (str, EditRecord)) or len(records) == 0:
        raise ValueError("records must be a non-empty list of EditRecord")
    for index, record in enumerate(records):
        if not isinstance(record, EditRecord):
            raise ValueError(f"records[{index}] is a {type(record).__name__}, not an EditRecord")
        if dataset == "counterfact" and not record.ground_truth:
            raise ValueError(f"records[{index}] has no ground_truth; CounterFact scoring compares target_new with it")
    if locality == "agreement":
        if reference is None:
            raise ValueError("locality='agreement' needs reference=predict_locality_reference(model, tok, records) "
                             "computed on the unedited model")
        if len(reference) != len(records):
            raise ValueError(f"reference has {len(reference)} entries for {len(records)} records; "
                             "compute it with predict_locality_reference on these records")
        for index, (record, ref) in enumerate(zip(records, reference)):
            if len(ref) != len(record.locality_prompts):
                raise ValueError(f"reference[{index}] has {len(ref)} entries for {len(record.locality_prompts)} "
                                 "locality prompts; compute it with predict_locality_reference on these records")
    elif reference is not None:
        raise ValueError("reference is only used with locality='agreement'")


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def _summary(dataset: str, locality: str, per_example: dict[str, list[Optional[float]]]) -> dict[str, Any]:
    result: dict[str, Any] = {"dataset": dataset, "locality": locality, "n_records": len(per_example["efficacy"])}
    for metric in METRICS:
        result[metric] = _mean([v for v in per_example[metric] if v is not None])
    result["per_example"] = per_example
    return result


def evaluate_records(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    *,
    dataset: str,
    locality: str = "gold",
    reference: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    batch_size: int = 16,
    progress: bool = True,
    scoring: str = "auto",
) -> dict[str, Any]:
    """Efficacy, generalization and specificity of ``model`` on ``records`` (fractions in [0, 1]).

    Returns ``{"dataset", "locality", "n_records", "efficacy", "generalization", "specificity",
    "portability", "per_example": {metric: [float or None per record]}}``; a metric is None when no
    record has the prompts it needs (None entries mark records without rephrases, locality or
    portability prompts).
    ``locality="agreement"`` needs ``reference`` from :func:`predict_locality_reference`.
    ``scoring="auto"`` picks probability comparisons for CounterFact and token accuracy for ZsRE;
    ``"accuracy"`` scores CounterFact the way EasyEdit and the COMEBA-HK paper do.
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {list(SCORING)}, got {scoring!r}")
    probability = scoring == "probability" or (scoring == "auto" and dataset == "counterfact")
    _check_inputs(records, "counterfact" if probability else "zsre", locality, reference, batch_size)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    queries = _Queries()
    plan = []
    for record in records:
        if not probability:
            edit = [(queries.add(record.prompt, record.target_new),)]
            rephrase = [(queries.add(p, record.target_new),) for p in record.rephrase_prompts]
        else:
            edit = [_pair(queries, record.prompt, record.target_new, record.ground_truth)]
            rephrase = [_pair(queries, p, record.target_new, record.ground_truth) for p in record.rephrase_prompts]
        if probability and locality == "gold":
            local = [_pair(queries, p, a, record.target_new) for p, a in zip(record.locality_prompts, record.locality_answers)]
        else:
            local = [(queries.add(p, a),) for p, a in zip(record.locality_prompts, record.locality_answers)]
        if not probability:
            portable = [(queries.add(p, a),) for p, a in zip(record.portability_prompts, record.portability_answers)]
        else:
            portable = [_pair(queries, p, a, old) for p, a, old in
                        zip(record.portability_prompts, record.portability_answers, record.portability_old_answers)]
        plan.append((edit, rephrase, local, portable))
    with tqdm(total=len(queries.prompts), desc=f"evaluating {dataset}", unit="prompt", disable=not progress) as bar:
        scored = score_answers(model, tokenizer, queries.prompts, queries.answers, batch_size=batch_size, bar=bar)

    def success(query: tuple[int, ...]) -> float:
        if len(query) == 2:
            return float(scored[query[0]].mean_logprob > scored[query[1]].mean_logprob)
        return scored[query[0]].accuracy

    per_example: dict[str, list[Optional[float]]] = {metric: [] for metric in METRICS}
    for index, (edit, rephrase, local, portable) in enumerate(plan):
        per_example["efficacy"].append(success(edit[0]))
        per_example["generalization"].append(_mean([success(q) for q in rephrase]))
        if locality == "agreement":
            values = [_agreement(scored[q[0]], ref, index, j) for j, (q, ref) in enumerate(zip(local, reference[index]))]
        else:
            values = [success(q) for q in local]
        per_example["specificity"].append(_mean(values))
        per_example["portability"].append(_mean([success(q) for q in portable]))
    summary = _summary(dataset, locality, per_example)
    summary["scoring"] = "probability" if probability else "accuracy"
    return summary


def _pair(queries: _Queries, prompt: str, winner: str, loser: str) -> tuple[int, int]:
    """Two queries whose comparison is a success when ``winner`` out-scores ``loser``."""
    return queries.add(prompt, winner), queries.add(prompt, loser)


def _agreement(scored: ScoredAnswer, reference: Sequence[int], record: int, prompt: int) -> float:
    ref = torch.as_tensor(list(reference), dtype=torch.long)
    if ref.shape != scored.argmax.shape:
        raise ValueError(f"reference[{record}][{prompt}] has {ref.numel()} tokens but the locality answer has "
                         f"{scored.argmax.numel()}; the reference was computed for other records or another tokenizer")
    return token_accuracy(scored.argmax, ref)


def predict_locality_reference(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[list[int]]]:
    """The unedited model's arg-max tokens at every locality-answer position, per record and prompt.

    Teacher-forced on the gold locality answer, exactly as :func:`evaluate_records` scores it.
    Capture it before editing and pass it as ``reference`` with ``locality="agreement"``.
    """
    _check_inputs(records, "zsre", "gold", None, batch_size)
    queries = _Queries()
    owners = []
    for index, record in enumerate(records):
        for prompt, answer in zip(record.locality_prompts, record.locality_answers):
            queries.add(prompt, answer)
            owners.append(index)
    reference: list[list[list[int]]] = [[] for _ in records]
    if not owners:
        return reference
    with tqdm(total=len(owners), desc="locality reference", unit="prompt", disable=not progress) as bar:
        scored = score_answers(model, tokenizer, queries.prompts, queries.answers, batch_size=batch_size, bar=bar)
    for owner, item in zip(owners, scored):
        reference[owner].append(item.argmax.tolist())
    return reference
