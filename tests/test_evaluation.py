"""Teacher-forced metrics: an oracle model scores exactly 1 where it knows the answer and 0 elsewhere,
batching never changes a score, agreement with oneself is 1, and CounterFact comparisons on SmolLM2 are sane."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest
import torch
from torch import nn

from smedit_plugin.records import EditRecord, load_counterfact, load_zsre
from smedit_plugin.evaluation import evaluate_records, predict_locality_reference, score_answers, token_accuracy
from smedit_plugin.hypernet.losses import answer_cross_entropy
from smedit_plugin.text import build_batch, tokenize_pair


class Oracle(nn.Module):
    """Knows the next token after every prefix of the (prompt, answer) pairs it was built from; flat logits elsewhere.

    A flat row's arg-max is token 0, which is never an answer token, so unknown answers score 0.
    """

    def __init__(self, tok, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.vocab = len(tok)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.table: dict[tuple[int, ...], int] = {}
        for prompt, answer in pairs:
            prompt_ids, answer_ids = tokenize_pair(tok, prompt, answer)
            full = prompt_ids + answer_ids
            for k in range(len(prompt_ids), len(full)):
                self.table[tuple(full[:k])] = full[k]

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                nxt = self.table.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits


class OracleWithLogitsToKeep(Oracle):
    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        logits = self._logits(input_ids)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


class OracleFullLogits(Oracle):
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self._logits(input_ids))


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny("smollm2", n_layers=1)[1]


@pytest.fixture(scope="module")
def zsre(zsre_eval_path: Path) -> list[EditRecord]:
    return load_zsre(zsre_eval_path, limit=6)


@pytest.fixture(scope="module")
def counterfact(counterfact_eval_path: Path) -> list[EditRecord]:
    """Real ROME records cut to 3 neighbourhood prompts each, to keep SmolLM2 runs short."""
    return [dataclasses.replace(r, locality_prompts=r.locality_prompts[:3], locality_answers=r.locality_answers[:3])
            for r in load_counterfact(counterfact_eval_path, limit=6)]


def test_token_accuracy() -> None:
    assert token_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError):
        token_accuracy(torch.tensor([1]), torch.tensor([1, 2]))


@pytest.mark.parametrize("oracle_class", [OracleWithLogitsToKeep, OracleFullLogits])
def test_a_model_that_knows_every_answer_scores_one(tok, zsre, oracle_class) -> None:
    pairs = [(r.prompt, r.target_new) for r in zsre]
    pairs += [(p, r.target_new) for r in zsre for p in r.rephrase_prompts]
    pairs += [(p, a) for r in zsre for p, a in zip(r.locality_prompts, r.locality_answers)]
    result = evaluate_records(oracle_class(tok, pairs), tok, zsre, dataset="zsre", batch_size=4, progress=False)
    assert (result["efficacy"], result["generalization"], result["specificity"]) == (1.0, 1.0, 1.0)
    assert result["per_example"]["efficacy"] == [1.0] * len(zsre)
    assert result["n_records"] == len(zsre) and result["dataset"] == "zsre" and result["locality"] == "gold"


def test_each_metric_reads_only_its_own_prompts(tok, zsre) -> None:
    edit_only = OracleWithLogitsToKeep(tok, [(r.prompt, r.target_new) for r in zsre])
    result = evaluate_records(edit_only, tok, zsre, dataset="zsre", progress=False)
    assert (result["efficacy"], result["generalization"], result["specificity"]) == (1.0, 0.0, 0.0)
    half = zsre[:3]
    partial = OracleWithLogitsToKeep(tok, [(r.prompt, r.target_new) for r in half])
    result = evaluate_records(partial, tok, zsre, dataset="zsre", progress=False)
    assert result["per_example"]["efficacy"] == [1.0] * 3 + [0.0] * 3 and result["efficacy"] == 0.5


def test_per_example_accuracy_is_the_fraction_of_answer_tokens(tok) -> None:
    record = EditRecord(prompt="Who designed the Eiffel Tower?", target_new="Gustave Eiffel and his engineers")
    prompt_ids, answer_ids = tokenize_pair(tok, record.prompt, record.target_new)
    known = len(answer_ids) // 2
    oracle = OracleWithLogitsToKeep(tok, [])
    full = prompt_ids + answer_ids
    for k in range(len(prompt_ids), len(prompt_ids) + known):
        oracle.table[tuple(full[:k])] = full[k]
    result = evaluate_records(oracle, tok, [record], dataset="zsre", progress=False)
    assert result["efficacy"] == pytest.approx(known / len(answer_ids))
    assert result["generalization"] is None and result["specificity"] is None
    assert result["per_example"]["generalization"] == [None]


def test_counterfact_oracle_for_the_winning_targets_scores_one(tok, counterfact) -> None:
    pairs = [(r.prompt, r.target_new) for r in counterfact]
    pairs += [(p, r.target_new) for r in counterfact for p in r.rephrase_prompts]
    pairs += [(p, a) for r in counterfact for p, a in zip(r.locality_prompts, r.locality_answers)]
    result = evaluate_records(OracleWithLogitsToKeep(tok, pairs), tok, counterfact, dataset="counterfact",
                              progress=False)
    assert (result["efficacy"], result["generalization"], result["specificity"]) == (1.0, 1.0, 1.0)
    truthful = [(r.prompt, r.ground_truth) for r in counterfact]
    truthful += [(p, r.ground_truth) for r in counterfact for p in r.rephrase_prompts]
    result = evaluate_records(OracleWithLogitsToKeep(tok, truthful), tok, counterfact, dataset="counterfact",
                              progress=False)
    assert (result["efficacy"], result["generalization"]) == (0.0, 0.0)


def test_portability_is_scored_on_its_own_questions_and_absent_is_none(tok, zsre) -> None:
    """The real one-hop questions: a model that knows only their answers has PS 1 and ES 0; no questions, None."""
    assert all(r.portability_prompts for r in zsre)
    hops = OracleWithLogitsToKeep(tok, [(p, a) for r in zsre for p, a in zip(r.portability_prompts,
                                                                             r.portability_answers)])
    result = evaluate_records(hops, tok, zsre, dataset="zsre", progress=False)
    assert (result["efficacy"], result["portability"]) == (0.0, 1.0)
    edits = OracleWithLogitsToKeep(tok, [(r.prompt, r.target_new) for r in zsre])
    assert evaluate_records(edits, tok, zsre, dataset="zsre", progress=False)["portability"] == 0.0
    mixed = zsre[:2] + [dataclasses.replace(r, portability_prompts=(), portability_answers=()) for r in zsre[2:]]
    result = evaluate_records(hops, tok, mixed, dataset="zsre", progress=False)
    assert result["per_example"]["portability"] == [1.0, 1.0] + [None] * 4 and result["portability"] == 1.0
    none = evaluate_records(hops, tok, mixed[2:], dataset="zsre", progress=False)
    assert none["portability"] is None and none["per_example"]["portability"] == [None] * 4


def test_portability_answered_by_the_edit_target_rises_with_the_edit_and_equals_efficacy(tiny, zsre) -> None:
    """A one-hop question that asks the edit itself, answered by its target: PS is ES before and after the edit.

    The edit here is plain fine-tuning of a tiny model on the edit pairs until it has learnt them.
    """
    model, tok = tiny("smollm2", n_layers=2)
    records = [dataclasses.replace(r, portability_prompts=(r.prompt,), portability_answers=(r.target_new,))
               for r in zsre[:3]]
    before = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    batch = build_batch(tok, [r.prompt for r in records], [r.target_new for r in records])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        answer_cross_entropy(model, batch).backward()
        optimizer.step()
    after = evaluate_records(model, tok, records, dataset="zsre", progress=False)
    assert before["per_example"]["portability"] == before["per_example"]["efficacy"]
    assert after["per_example"]["portability"] == after["per_example"]["efficacy"]
    assert after["portability"] > before["portability"] and after["portability"] == 1.0


def test_probability_portability_compares_new_with_old_where_the_pair_exists(tok, counterfact) -> None:
    question = "Which language do people speak in the country where the Eiffel Tower stands?"
    paired = [dataclasses.replace(r, portability_prompts=(question,), portability_answers=("English",),
                                  portability_old_answers=("French",)) for r in counterfact[:2]]
    unpaired = dataclasses.replace(counterfact[2], portability_prompts=(question,), portability_answers=("English",))
    records = paired + [unpaired]
    new = evaluate_records(OracleWithLogitsToKeep(tok, [(question, "English")]), tok, records, dataset="counterfact",
                           progress=False)
    assert new["per_example"]["portability"] == [1.0, 1.0, None] and new["portability"] == 1.0
    old = evaluate_records(OracleWithLogitsToKeep(tok, [(question, "French")]), tok, records, dataset="counterfact",
                           progress=False)
    assert old["portability"] == 0.0
    accuracy = evaluate_records(OracleWithLogitsToKeep(tok, [(question, "English")]), tok, records,
                                dataset="counterfact", scoring="accuracy", progress=False)
    assert accuracy["per_example"]["portability"] == [1.0, 1.0, 1.0]


def test_batching_and_padding_never_change_a_score(tiny, zsre) -> None:
    model, tok = tiny("llama3", n_layers=2)
    prompts = [r.prompt for r in zsre] + [r.locality_prompts[0] for r in zsre]
    answers = [r.target_new for r in zsre] + [r.locality_answers[0] for r in zsre]
    one_by_one = score_answers(model, tok, prompts, answers, batch_size=1)
    batched = score_answers(model, tok, prompts, answers, batch_size=5)
    for a, b, (prompt, answer) in zip(one_by_one, batched, zip(prompts, answers)):
        assert torch.equal(a.target, b.target)
        assert a.target.tolist() == tokenize_pair(tok, prompt, answer)[1]
        assert torch.equal(a.argmax, b.argmax)
        assert torch.allclose(a.logprob, b.logprob, atol=1e-5)
        assert a.logprob.dtype == torch.float32 and (a.logprob <= 0).all()


def test_unbatched_reference_computation_matches(tiny, zsre) -> None:
    """Score one pair by hand with a plain forward pass and compare with score_answers."""
    model, tok = tiny("gemma-3", n_layers=2)
    record = zsre[0]
    prompt_ids, answer_ids = tokenize_pair(tok, record.prompt, record.target_new)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids[:-1]])).logits[0].float()
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids))
    expected = torch.log_softmax(logits, -1)[list(positions), answer_ids]
    (scored,) = score_answers(model, tok, [record.prompt], [record.target_new])
    assert torch.allclose(scored.logprob, expected, atol=1e-5)
    assert scored.argmax.tolist() == logits[list(positions)].argmax(-1).tolist()


def test_agreement_with_itself_is_one_and_drops_after_a_change(tiny, zsre) -> None:
    model, tok = tiny("smollm2", n_layers=2)
    model.train()
    reference = predict_locality_reference(model, tok, zsre)
    assert model.training
    assert [len(r) for r in reference] == [1] * len(zsre)
    assert all(len(r[0]) == len(tokenize_pair(tok, rec.locality_prompts[0], rec.locality_answers[0])[1])
               for r, rec in zip(reference, zsre))
    same = evaluate_records(model, tok, zsre, dataset="zsre", locality="agreement", reference=reference, progress=False)
    assert same["specificity"] == 1.0 and same["locality"] == "agreement"
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.norm.weight.mul_(-1.0)
    moved = evaluate_records(changed, tok, zsre, dataset="zsre", locality="agreement", reference=reference,
                             progress=False)
    assert moved["specificity"] < 1.0


def test_bf16_model_is_scored_in_fp32(tiny, zsre) -> None:
    model, tok = tiny("smollm2", n_layers=2)
    (fp32,) = score_answers(model, tok, [zsre[0].prompt], [zsre[0].target_new])
    (bf16,) = score_answers(model.to(torch.bfloat16), tok, [zsre[0].prompt], [zsre[0].target_new])
    assert bf16.logprob.dtype == torch.float32
    assert torch.allclose(fp32.logprob, bf16.logprob, atol=0.1)


def test_bad_arguments_are_rejected_before_any_forward(tok, zsre) -> None:
    model = OracleWithLogitsToKeep(tok, [])

    def call(records=zsre, **kwargs):
        options = dict(dataset="zsre", progress=False)
        options.update(kwargs)
        return evaluate_records(model, tok, records, **options)

    with pytest.raises(ValueError, match="dataset must be one of"):
        call(dataset="fever")
    with pytest.raises(ValueError, match="locality must be one of"):
        call(locality="kl")
    with pytest.raises(ValueError, match="needs reference=predict_locality_reference"):
        call(locality="agreement")
    with pytest.raises(ValueError, match="reference has 1 entries for 6 records"):
        call(locality="agreement", reference=[[[1]]])
    with pytest.raises(ValueError, match="only used with locality='agreement'"):
        call(reference=[[[1]]] * 6)
    with pytest.raises(ValueError, match="non-empty list"):
        call(records=[])
    with pytest.raises(ValueError, match="batch_size"):
        call(batch_size=0)
    with pytest.raises(ValueError, match=r"records\[0\] has no ground_truth"):
        call(records=[EditRecord(prompt="p", target_new="t")], dataset="counterfact")
    wrong_length = [[[1, 2, 3, 4, 5, 6, 7, 8, 9]] for _ in zsre]
    with pytest.raises(ValueError, match=r"reference\[0\]\[0\] has 9 tokens"):
        call(locality="agreement", reference=wrong_length)


@pytest.mark.slow
def test_smollm2_counterfact_comparisons_are_sane(smollm2, counterfact) -> None:
    model, tok = smollm2
    result = evaluate_records(model, tok, counterfact, dataset="counterfact", progress=False)
    for metric in ("efficacy", "generalization", "specificity"):
        assert 0.0 <= result[metric] <= 1.0
        assert len(result["per_example"][metric]) == len(counterfact)
    swapped = [dataclasses.replace(r, target_new=r.ground_truth, ground_truth=r.target_new, locality_prompts=(),
                                   locality_answers=()) for r in counterfact]
    flipped = evaluate_records(model, tok, swapped, dataset="counterfact", progress=False)
    for a, b in zip(result["per_example"]["efficacy"], flipped["per_example"]["efficacy"]):
        assert a + b == 1.0
    for a, b in zip(result["per_example"]["generalization"], flipped["per_example"]["generalization"]):
        assert a + b == pytest.approx(1.0)
    assert flipped["specificity"] is None

    known = EditRecord(prompt="The capital of France is", target_new="London", ground_truth="Paris",
                       rephrase_prompts=("The capital city of France is",),
                       locality_prompts=("The capital of Italy is",), locality_answers=("Rome",))
    facts = evaluate_records(model, tok, [known], dataset="counterfact", progress=False)
    assert (facts["efficacy"], facts["generalization"], facts["specificity"]) == (0.0, 0.0, 1.0)


@pytest.mark.slow
def test_smollm2_zsre_gold_locality_and_agreement(smollm2, zsre) -> None:
    model, tok = smollm2
    gold = evaluate_records(model, tok, zsre, dataset="zsre", progress=False)
    for metric in ("efficacy", "generalization", "specificity"):
        assert 0.0 <= gold[metric] <= 1.0
    reference = predict_locality_reference(model, tok, zsre)
    agree = evaluate_records(model, tok, zsre, dataset="zsre", locality="agreement", reference=reference,
                             progress=False)
    assert agree["specificity"] == 1.0
    assert agree["efficacy"] == gold["efficacy"] and agree["generalization"] == gold["generalization"]
    knows_paris = EditRecord(prompt="The capital of France is", target_new="Paris")
    assert evaluate_records(model, tok, [knows_paris], dataset="zsre", progress=False)["efficacy"] == 1.0
