"""General-capability check: GLUE-style loaders, candidate scoring and perplexity.

Mechanics on tiny random models: scores equal a direct single-sequence computation, padding (left or
right, any batch) never changes a score, a logit boost decides the answer, perplexity is exp of the
mean CE computed by hand. One slow test checks perplexity on real SmolLM2.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smedit_plugin.general import (GLUE_DIR_ENV, GLUE_TASKS, GlueItem, general_report, glue_accuracy, load_glue_task,
                                   score_choices)
from smedit_plugin.perplexity import perplexity, read_text_tokens, token_perplexity
from smedit_plugin.shipped import WIKITEXT2_TEST

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
TEXT = "The quick brown fox jumps over the lazy dog. " * 12 + "Editing a fact should leave the rest alone."


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    if not all((GLUE_DIR / f"{task}.json").is_file() for task in GLUE_TASKS):
        pytest.skip(f"shared GLUE files are not available in {GLUE_DIR}")
    return GLUE_DIR


@pytest.fixture(scope="module")
def small(tiny):
    return tiny("smollm2", n_layers=2)


def _direct_mean_logprob(model, tok, prompt: str, answer: str) -> float:
    """One unpadded sequence, full logits: the definition the batched scorer must reproduce."""
    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(answer_ids)) / len(answer_ids))


def _write_task(folder: Path, task: str, records: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.json").write_text(json.dumps(records))
    return folder


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", GLUE_TASKS)
def test_loader_is_seeded_label_balanced_and_framed(glue_dir: Path, task: str) -> None:
    items = load_glue_task(task, 20, data_dir=glue_dir)
    assert len(items) == 20 and all(isinstance(item, GlueItem) for item in items)
    assert items == load_glue_task(task, 20, data_dir=glue_dir)
    assert items != load_glue_task(task, 20, data_dir=glue_dir, seed=1)
    counts = [sum(item.label == k for item in items) for k in range(len(items[0].choices))]
    assert counts == [20 // len(counts)] * len(counts)
    assert len({item.prompt for item in items}) == 20
    suffix = {"sst2": "\nSentiment :", "mrpc": "\nAnswer:", "cola": "\nAnswer:", "rte": " True or False?\nanswer:",
              "nli": " True or False? Answer:", "mmlu": "\nAnswer:"}[task]
    assert all(item.prompt.endswith(suffix) for item in items)


def test_loader_reads_all_records_and_the_env_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"sentence": f"film {i}", "label": i % 2, "idx": i} for i in range(7)]
    monkeypatch.setenv(GLUE_DIR_ENV, str(_write_task(tmp_path / "env", "sst2", records)))
    items = load_glue_task("sst2", None)
    assert [item.prompt for item in items] == [f"Review : film {i}\nSentiment :" for i in range(7)]
    assert [item.choices[item.label] for item in items] == ["negative", "positive"] * 3 + ["negative"]
    assert len(load_glue_task("sst2", 3)) == 3


def test_label_semantics_follow_the_data(tmp_path: Path) -> None:
    """GLUE RTE: label 0 is entailment, so its gold answer is "True" (the reference inverts this)."""
    pair = {"sentence1": "A cat sat.", "sentence2": "A cat sat."}
    folder = _write_task(tmp_path, "rte", [dict(pair, label=0, idx=0), dict(pair, label=1, idx=1)])
    _write_task(folder, "nli", [dict(pair, label="entailment", index="0"),
                                dict(pair, label="not_entailment", index="1")])
    _write_task(folder, "mmlu", [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}])
    for task in ("rte", "nli"):
        items = load_glue_task(task, None, data_dir=folder)
        assert [item.choices[item.label] for item in items] == ["True", "False"]
    (mmlu,) = load_glue_task("mmlu", None, data_dir=folder)
    assert mmlu.choices[mmlu.label] == "B" and "(B) 4\n" in mmlu.prompt


def test_loader_errors_name_the_task_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GLUE_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"'cola'.*data_dir=.*SMEDIT_GLUE_DIR"):
        load_glue_task("cola", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'qqp'"):
        load_glue_task("qqp", data_dir=tmp_path)
    _write_task(tmp_path, "mrpc", [{"sentence1": "a", "label": 1, "idx": 0}])
    with pytest.raises(ValueError, match="mrpc.json record 0 has no 'sentence2'"):
        load_glue_task("mrpc", data_dir=tmp_path)
    _write_task(tmp_path, "sst2", [{"sentence": "a", "label": 2}])
    with pytest.raises(ValueError, match="label=2 is not one of"):
        load_glue_task("sst2", data_dir=tmp_path)
    _write_task(tmp_path, "sst2", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0}])
    with pytest.raises(ValueError, match="n_items=3 but .* has only 2 records"):
        load_glue_task("sst2", 3, data_dir=tmp_path)
    with pytest.raises(ValueError, match="n_items must be a positive int"):
        load_glue_task("sst2", 0, data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Candidate scoring
# --------------------------------------------------------------------------------------------

PROMPTS = ["Review : fine\nSentiment :",
           "Question: Which planet is the largest in the solar system, by a long way?\nAnswer:",
           "Is this sentence linguistically acceptable?\nSentence: Him went home quickly yesterday.\nAnswer:"]
CHOICES = [("negative", "positive"), ("A", "B", "Jupiter the gas giant"), ("No", "Yes")]


def test_scores_equal_a_direct_single_sequence_computation(small) -> None:
    """Includes a multi-token candidate, which needs its own row next to the shared single-token row."""
    model, tok = small
    scores = score_choices(model, tok, PROMPTS, CHOICES, batch_size=2)
    for prompt, options, row in zip(PROMPTS, CHOICES, scores):
        expected = [_direct_mean_logprob(model, tok, prompt, option) for option in options]
        assert row == pytest.approx(expected, abs=1e-5)


def _tiny_gpt2(tok):
    """Absolute position embeddings: a left-padded row only matches its unpadded self with mask-derived positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["smollm2", "gpt-j", "gemma-3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_an_item_scores_the_same_alone_and_in_a_padded_batch(tiny, arch: str, side: str) -> None:
    """GPT-J has no ``logits_to_keep`` (full-logit path); rotary models hide a wrong position offset, GPT-2 does not."""
    if arch == "gpt2":
        _, tok = tiny("smollm2", n_layers=1)
        model = _tiny_gpt2(tok)
    else:
        model, tok = tiny(arch, n_layers=2)
    alone = score_choices(model, tok, PROMPTS[:1], CHOICES[:1], padding_side=side)[0]
    batched = score_choices(model, tok, PROMPTS[1:] + PROMPTS[:1], CHOICES[1:] + CHOICES[:1], padding_side=side)
    assert batched[-1] == pytest.approx(alone, abs=1e-5)
    assert alone == pytest.approx([_direct_mean_logprob(model, tok, PROMPTS[0], c) for c in CHOICES[0]], abs=1e-5)


def test_the_candidate_with_the_higher_logprob_is_chosen(small) -> None:
    """A +30 logit on " positive" makes it win every item; accuracy then counts the positive labels."""
    model, tok = small
    boosted = tok(" positive", add_special_tokens=False)["input_ids"][0]

    def boost(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., boosted] += 30.0
        return output

    items = [GlueItem(f"Review : film {i}\nSentiment :", ("negative", "positive"), label) for i, label in
             enumerate([1, 1, 0, 1])]
    handle = model.get_output_embeddings().register_forward_hook(boost)
    try:
        assert glue_accuracy(model, tok, items) == 0.75
        assert glue_accuracy(model, tok, [GlueItem(i.prompt, i.choices[::-1], 1 - i.label) for i in items]) == 0.75
    finally:
        handle.remove()
    scores = score_choices(model, tok, [items[0].prompt], [items[0].choices])[0]
    direct_label = max(range(2), key=scores.__getitem__)
    assert glue_accuracy(model, tok, [GlueItem(items[0].prompt, items[0].choices, direct_label)]) == 1.0
    assert glue_accuracy(model, tok, [GlueItem(items[0].prompt, items[0].choices, 1 - direct_label)]) == 0.0


def test_half_precision_models_are_scored_in_fp32(tiny) -> None:
    model, tok = tiny("smollm2", n_layers=2)
    reference = score_choices(model, tok, PROMPTS, CHOICES)
    scores = score_choices(model.to(torch.bfloat16), tok, PROMPTS, CHOICES)
    for row, ref in zip(scores, reference):
        assert all(math.isfinite(s) for s in row)
        assert row == pytest.approx(ref, abs=0.05)


def test_scoring_rejects_malformed_inputs(small) -> None:
    model, tok = small
    with pytest.raises(ValueError, match="equal-length"):
        score_choices(model, tok, PROMPTS, CHOICES[:2])
    with pytest.raises(ValueError, match=r"choices\[0\] must list at least two"):
        score_choices(model, tok, PROMPTS[:1], [("positive",)])
    with pytest.raises(ValueError, match="padding_side must be one of"):
        score_choices(model, tok, PROMPTS, CHOICES, padding_side="middle")


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------

def _hand_nll(model, window_ids: list[int], predicted: range) -> list[float]:
    """NLL of ``window_ids[p]`` for each ``p`` in ``predicted``, from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window_ids])).logits[0].float()
    return [float(F.cross_entropy(logits[p - 1], torch.tensor(window_ids[p]))) for p in predicted]


def test_perplexity_of_one_window_is_exp_of_the_mean_ce(small, tmp_path: Path) -> None:
    model, tok = small
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:64]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = math.exp(float(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))))
    assert perplexity(model, tok, path, max_tokens=64, window=64) == pytest.approx(expected, rel=1e-5)
    assert read_text_tokens(tok, path, 64) == ids


def test_strided_windows_predict_each_token_once_with_overlap_as_context(small) -> None:
    model, _ = small
    ids = list(range(100, 116))
    nll = _hand_nll(model, ids[0:8], range(1, 8))
    nll += _hand_nll(model, ids[4:12], range(4, 8))
    nll += _hand_nll(model, ids[8:16], range(4, 8))
    assert token_perplexity(model, ids, window=8, stride=4) == pytest.approx(math.exp(sum(nll) / 15), rel=1e-5)
    disjoint = _hand_nll(model, ids[0:8], range(1, 8)) + _hand_nll(model, ids[8:16], range(1, 8))
    assert token_perplexity(model, ids, window=8) == pytest.approx(math.exp(sum(disjoint) / 14), rel=1e-5)
    with_bos = _hand_nll(model, [7] + ids[0:8], range(1, 9)) + _hand_nll(model, [7] + ids[8:16], range(1, 9))
    assert token_perplexity(model, ids, window=8, prefix_ids=[7]) == pytest.approx(math.exp(sum(with_bos) / 16),
                                                                                  rel=1e-5)


def test_perplexity_errors(small, tmp_path: Path) -> None:
    model, tok = small
    with pytest.raises(FileNotFoundError, match="text_path="):
        perplexity(model, tok, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        token_perplexity(model, [1, 2, 3], window=1)
    with pytest.raises(ValueError, match=r"stride must be an int in \[1, window=4\]"):
        token_perplexity(model, [1, 2, 3], window=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_perplexity(model, [1], window=4)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def test_report_is_deterministic_bounded_and_leaves_the_model_as_found(small, glue_dir: Path, tmp_path: Path) -> None:
    model, tok = small
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    model.train()
    try:
        first = general_report(model, tok, n_items=8, ppl_tokens=96, data_dir=glue_dir, text_path=path, window=48)
        assert model.training
        assert all(p.grad is None for p in model.parameters())
        second = general_report(model, tok, n_items=8, ppl_tokens=96, data_dir=glue_dir, text_path=path, window=48)
    finally:
        model.eval()
    assert set(first["glue"]) == set(GLUE_TASKS)
    assert all(0.0 <= acc <= 1.0 for acc in first["glue"].values())
    assert first["glue"] == second["glue"] and first["perplexity"] == second["perplexity"]
    assert first["n_items"] == {task: 8 for task in GLUE_TASKS} and first["ppl_tokens"] == 96
    assert first["perplexity"] > 1.0 and first["seconds"] > 0.0


def test_report_parts_can_be_skipped_and_tasks_are_checked_first(small) -> None:
    model, tok = small
    report = general_report(model, tok, tasks=(), ppl_tokens=None)
    assert report["glue"] == {} and report["perplexity"] is None and report["ppl_tokens"] is None
    with pytest.raises(ValueError, match="not the string 'sst2'"):
        general_report(model, tok, tasks="sst2")
    with pytest.raises(ValueError, match="unknown GLUE task 'boolq'"):
        general_report(model, tok, tasks=("sst2", "boolq"))


# --------------------------------------------------------------------------------------------
# Real SmolLM2
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_perplexity_on_wikitext_is_sane(smollm2) -> None:
    """Measured on 1,024 WikiText-2 test tokens, windows of 512: 28.2; tokens shuffled: 3,007 (about 7 s each)."""
    if not WIKITEXT2_TEST.is_file():
        pytest.skip(f"shared text file {WIKITEXT2_TEST} is not available")
    model, tok = smollm2
    ids = read_text_tokens(tok, max_tokens=1024)
    assert len(ids) == 1024
    ppl = perplexity(model, tok, max_tokens=1024, window=512)
    assert 5.0 < ppl < 100.0
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert token_perplexity(model, shuffled, window=512) > 10 * ppl
