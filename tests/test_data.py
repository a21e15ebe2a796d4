"""Record loaders on the real ZsRE/CounterFact files, EasyEdit request dicts, and the shared tokenisation."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from smedit_plugin.records import EditRecord, detect_dataset, load_counterfact, load_records, load_zsre, sample_path, zsre_locality_prompt
from smedit_plugin.requests import to_edit_kwargs, to_requests
from smedit_plugin.text import IGNORE_INDEX, build_batch, iter_micro_batches, tokenize_pair

EASYEDIT_REQUEST_KEYS = ["prompt", "target_new", "ground_truth", "portability", "locality", "subject", "rephrase_prompt"]


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# ZsRE
# --------------------------------------------------------------------------------------------

def test_zsre_fields_map_like_the_mend_release(zsre_eval_path: Path) -> None:
    raw = json.loads(zsre_eval_path.read_text())[:5]
    records = load_zsre(zsre_eval_path, limit=5)
    assert len(records) == 5
    for index, (rec, src) in enumerate(zip(records, raw)):
        assert rec.prompt == src["src"] and rec.target_new == src["alt"]
        assert rec.ground_truth == rec.target_true == src["answers"][0]
        assert rec.subject == src["subject"] and rec.subject in rec.prompt
        assert rec.rephrase_prompts == (src["rephrase"],)
        assert src["loc"].startswith("nq question: ")
        assert rec.locality_prompts == (src["loc"][len("nq question: "):] + "?",)
        assert rec.locality_answers == (src["loc_ans"],)
        assert rec.case_id == index
        assert rec.portability_prompts == (src["portability"]["New Question"],)
        assert rec.portability_answers == (src["portability"]["New Answer"],)
        assert rec.portability_old_answers == ()
    kept = load_zsre(zsre_eval_path, limit=1, keep_nq_prefix=True)[0]
    assert kept.locality_prompts == (raw[0]["loc"] + "?",)


def test_zsre_locality_prompt_is_not_doubled() -> None:
    assert zsre_locality_prompt("nq question: who is it") == "who is it?"
    assert zsre_locality_prompt("who is it?") == "who is it?"
    assert zsre_locality_prompt("nq question: who is it", keep_nq_prefix=True) == "nq question: who is it?"


def test_zsre_skips_empty_alt_and_counts_limit_after_skipping(zsre_train_path: Path, tmp_path: Path) -> None:
    raw = json.loads(zsre_train_path.read_text())[:4]
    raw[1]["alt"] = ""
    path = _write(tmp_path, raw)
    records = load_zsre(path)
    assert [r.case_id for r in records] == [0, 2, 3]
    assert [r.case_id for r in load_zsre(path, limit=2)] == [0, 2]


def test_packaged_samples_are_real_zsre_records(zsre_train_path: Path, zsre_eval_path: Path) -> None:
    train = load_records(sample_path("zsre_sample"))
    evaluation = load_records(sample_path("zsre_sample_eval.json"))
    assert len(train) == 300 and len(evaluation) == 64
    assert json.loads(sample_path("zsre_sample").read_text()) == json.loads(zsre_train_path.read_text())[:300]
    assert json.loads(sample_path("zsre_sample_eval").read_text()) == json.loads(zsre_eval_path.read_text())[:64]
    assert not {r.prompt for r in train} & {r.prompt for r in evaluation}
    assert sample_path("zsre_sample").parent.joinpath("SAMPLE.md").is_file()
    total = sum(p.stat().st_size for p in sample_path("zsre_sample").parent.iterdir())
    assert total < 1_000_000
    with pytest.raises(FileNotFoundError, match="zsre_sample_eval"):
        sample_path("counterfact_sample")


# --------------------------------------------------------------------------------------------
# CounterFact, both schemas
# --------------------------------------------------------------------------------------------

def test_counterfact_rome_schema(counterfact_eval_path: Path) -> None:
    raw = json.loads(counterfact_eval_path.read_text())[:3]
    records = load_counterfact(counterfact_eval_path, limit=3)
    for rec, src in zip(records, raw):
        rewrite = src["requested_rewrite"]
        assert rec.prompt == rewrite["prompt"].format(rewrite["subject"])
        assert rec.subject == rewrite["subject"] and rec.subject in rec.prompt
        assert rec.target_new == rewrite["target_new"]["str"]
        assert rec.ground_truth == rec.target_true == rewrite["target_true"]["str"]
        assert rec.rephrase_prompts == tuple(src["paraphrase_prompts"])
        assert rec.locality_prompts == tuple(src["neighborhood_prompts"])
        assert rec.locality_answers == (rec.target_true,) * len(src["neighborhood_prompts"])
        assert rec.case_id == src["case_id"]


def test_counterfact_split_schema(counterfact_train_path: Path) -> None:
    raw = json.loads(counterfact_train_path.read_text())[:3]
    records = load_counterfact(counterfact_train_path, limit=3)
    for rec, src in zip(records, raw):
        assert (rec.prompt, rec.target_new, rec.ground_truth, rec.subject) == (
            src["prompt"], src["target_new"], src["ground_truth"], src["subject"])
        assert rec.rephrase_prompts == (src["rephrase_prompt"],)
        assert rec.locality_prompts == (src["locality_prompt"],)
        assert rec.locality_answers == (src["locality_ground_truth"],)
        assert rec.case_id == src["case_id"]


def test_dataset_is_detected_from_the_file(zsre_eval_path, counterfact_eval_path, counterfact_train_path) -> None:
    assert detect_dataset(zsre_eval_path) == "zsre"
    assert detect_dataset(counterfact_eval_path) == detect_dataset(counterfact_train_path) == "counterfact"
    assert load_records(counterfact_train_path, limit=2) == load_counterfact(counterfact_train_path, limit=2)
    assert load_records(zsre_eval_path, "zsre", limit=2) == load_zsre(zsre_eval_path, limit=2)
    with pytest.raises(ValueError, match="unknown dataset 'fever'"):
        load_records(zsre_eval_path, "fever")


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------

def test_malformed_files_name_the_file_record_and_field(zsre_train_path, counterfact_eval_path, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_zsre(tmp_path / "missing.json")
    bad_json = _write(tmp_path, "[{")
    with pytest.raises(ValueError, match=rf"{bad_json.name}: not valid JSON"):
        load_zsre(bad_json)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_zsre(_write(tmp_path, {"src": "x"}))

    zsre = json.loads(zsre_train_path.read_text())[:3]
    broken = copy.deepcopy(zsre)
    del broken[1]["loc_ans"]
    with pytest.raises(ValueError, match=r"records\.json: record 1: field 'loc_ans' is missing"):
        load_zsre(_write(tmp_path, broken))
    broken = copy.deepcopy(zsre)
    broken[2]["answers"] = []
    with pytest.raises(ValueError, match=r"record 2: field 'answers'"):
        load_zsre(_write(tmp_path, broken))
    broken = copy.deepcopy(zsre)
    broken[0]["src"] = 7
    with pytest.raises(ValueError, match=r"record 0: field 'src' must be a string"):
        load_zsre(_write(tmp_path, broken))
    broken = copy.deepcopy(zsre)
    broken[1]["subject"] = "Nobody Inparticular"
    with pytest.raises(ValueError, match=r"record 1: field 'subject'.*does not occur in the src"):
        load_zsre(_write(tmp_path, broken))

    cf = json.loads(counterfact_eval_path.read_text())[:2]
    broken = copy.deepcopy(cf)
    broken[1]["requested_rewrite"]["prompt"] = "The mother tongue of X is"
    with pytest.raises(ValueError, match=r"record 1: field 'requested_rewrite.prompt'.*placeholder"):
        load_counterfact(_write(tmp_path, broken))
    broken = copy.deepcopy(cf)
    broken[0]["requested_rewrite"]["target_new"] = {"id": "Q1"}
    with pytest.raises(ValueError, match=r"record 0: field 'requested_rewrite.target_new'"):
        load_counterfact(_write(tmp_path, broken))
    broken = copy.deepcopy(cf)
    broken[1]["neighborhood_prompts"] = [""]
    with pytest.raises(ValueError, match=r"record 1: field 'neighborhood_prompts'"):
        load_counterfact(_write(tmp_path, broken))
    with pytest.raises(ValueError, match=r"record 0: not a CounterFact record"):
        load_counterfact(_write(tmp_path, [{"question": "q"}]))
    with pytest.raises(ValueError, match="cannot tell the dataset"):
        load_records(_write(tmp_path, [{"question": "q"}]))
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_zsre(zsre_train_path, limit=0)


def test_edit_record_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="target_new must be a non-empty string"):
        EditRecord(prompt="p", target_new=" ")
    with pytest.raises(ValueError, match="one answer per prompt"):
        EditRecord(prompt="p", target_new="t", locality_prompts=("a", "b"), locality_answers=("x",))
    with pytest.raises(ValueError, match="rephrase_prompts must be a sequence of strings"):
        EditRecord(prompt="p", target_new="t", rephrase_prompts="one string")
    rec = EditRecord(prompt="p", target_new="t", rephrase_prompts=["r"])
    assert rec.rephrase_prompts == ("r",)
    with pytest.raises(ValueError, match="2 portability_prompts but 1 portability_answers"):
        EditRecord(prompt="p", target_new="t", portability_prompts=("a", "b"), portability_answers=("x",))
    with pytest.raises(ValueError, match="1 portability_old_answers for 2 portability_prompts"):
        EditRecord(prompt="p", target_new="t", portability_prompts=("a", "b"), portability_answers=("x", "y"),
                   portability_old_answers=("z",))


def test_portability_is_kept_in_every_schema_and_absent_is_empty(zsre_train_path, counterfact_eval_path,
                                                                  counterfact_train_path, tmp_path) -> None:
    """EasyEdit's one-hop object (plus our optional old answer) on ZsRE and both CounterFact schemas."""
    assert all(r.portability_prompts == r.portability_answers == () for r in load_zsre(zsre_train_path, limit=3))
    one_hop = {"Recalled Relation": "(Rome, capital of, Italy)", "New Question": "Which country is that city the "
               "capital of?", "New Answer": "Italy", "Old Answer": "France"}
    for source in (counterfact_eval_path, counterfact_train_path):
        raw = json.loads(source.read_text())[:2]
        raw[1]["portability"] = one_hop
        records = load_counterfact(_write(tmp_path, raw))
        assert records[0].portability_prompts == ()
        assert records[1].portability_prompts == (one_hop["New Question"],)
        assert records[1].portability_answers == ("Italy",) and records[1].portability_old_answers == ("France",)
    raw = json.loads(zsre_train_path.read_text())[:2]
    raw[0]["portability"] = {"New Question": "Which country?", "New Answer": ""}
    with pytest.raises(ValueError, match=r"record 0: field 'portability\.New Answer' must be a non-empty string"):
        load_zsre(_write(tmp_path, raw))
    raw[0]["portability"] = ["Which country?", "Italy"]
    with pytest.raises(ValueError, match=r"record 0: field 'portability' must be an object with 'New Question'"):
        load_zsre(_write(tmp_path, raw))


# --------------------------------------------------------------------------------------------
# EasyEdit requests
# --------------------------------------------------------------------------------------------

def test_requests_have_easyedits_keys_order_and_locality_shape(zsre_eval_path, counterfact_eval_path) -> None:
    zsre = load_zsre(zsre_eval_path, limit=3)
    requests = to_requests(zsre)
    assert [list(r) for r in requests] == [EASYEDIT_REQUEST_KEYS] * 3
    first = requests[0]
    assert (first["prompt"], first["target_new"], first["ground_truth"]) == (zsre[0].prompt, zsre[0].target_new,
                                                                           zsre[0].ground_truth)
    assert first["portability"] == {"one_hop": {"prompt": zsre[0].portability_prompts[0],
                                                "ground_truth": zsre[0].portability_answers[0]}}
    assert first["locality"] == {"neighborhood": {"prompt": zsre[0].locality_prompts[0],
                                                  "ground_truth": zsre[0].locality_answers[0]}}
    assert first["rephrase_prompt"] == zsre[0].rephrase_prompts[0] and first["subject"] == zsre[0].subject
    assert "case_id" not in first

    cf = load_counterfact(counterfact_eval_path, limit=2)
    loc = to_requests(cf)[1]["locality"]["neighborhood"]
    assert loc["prompt"] == list(cf[1].locality_prompts) and len(loc["ground_truth"]) == 10
    kwargs = to_edit_kwargs(cf)
    assert set(kwargs) == {"prompts", "target_new", "ground_truth", "rephrase_prompts", "locality_inputs", "subject"}
    assert kwargs["rephrase_prompts"] == [r.rephrase_prompts[0] for r in cf]


def test_requests_leave_out_what_records_do_not_have() -> None:
    records = [EditRecord(prompt="Who wrote Hamlet?", target_new="Marlowe", locality_prompts=("q?",),
                          locality_answers=("a",)),
               EditRecord(prompt="Who painted Guernica?", target_new="Dali")]
    requests = to_requests(records)
    assert [list(r) for r in requests] == [["prompt", "target_new", "ground_truth", "portability", "locality"]] * 2
    assert requests[0]["ground_truth"] is None and requests[1]["locality"] == {}
    kwargs = to_edit_kwargs(records)
    assert kwargs["locality_inputs"]["neighborhood"]["prompt"] == ["q?", None]
    assert "subject" not in kwargs and "rephrase_prompts" not in kwargs and "portability_inputs" not in kwargs
    question = "Which country was the painter of Guernica from?"
    records[1] = dataclasses.replace(records[1], portability_prompts=(question,), portability_answers=("Spain",))
    kwargs = to_edit_kwargs(records, portability_key="hop")
    assert kwargs["portability_inputs"] == {"hop": {"prompt": [None, question], "ground_truth": [None, "Spain"]}}
    requests = to_requests(records, portability_key="hop")
    assert requests[0]["portability"] == {}
    assert requests[1]["portability"] == {"hop": {"prompt": question, "ground_truth": "Spain"}}
    with pytest.raises(ValueError, match=r"records\[0\].subject"):
        to_edit_kwargs([EditRecord(prompt="Who wrote Hamlet?", target_new="M", subject="Shakespeare")])


@pytest.mark.easyedit_head
def test_requests_equal_what_easyedit_itself_builds(zsre_eval_path, counterfact_eval_path) -> None:
    spec = importlib.util.find_spec("easyeditor")
    source = Path(list(spec.submodule_search_locations)[0]) / "editors" / "utils.py" if spec else None
    if source is None or not source.is_file() or "def _prepare_requests" not in source.read_text(encoding="utf-8"):
        pytest.skip("needs EasyEdit's GitHub source, whose editors/utils.py defines _prepare_requests")
    from smedit_plugin.easyedit import import_easyeditor

    import_easyeditor(tolerate_missing_vision=True)
    utils = importlib.import_module("easyeditor.editors.utils")
    for records in (load_zsre(zsre_eval_path, limit=4), load_counterfact(counterfact_eval_path, limit=4)):
        kwargs = to_edit_kwargs(records)
        assert utils._prepare_requests(**copy.deepcopy(kwargs)) == to_requests(records)


# --------------------------------------------------------------------------------------------
# Tokenisation (smedit_plugin.text)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny):
    return tiny("smollm2", n_layers=1)[1]


def test_labels_mark_exactly_the_positions_that_predict_answer_tokens(tok) -> None:
    prompts = ["The capital of France is", "Who wrote the play Hamlet?", "Q:"]
    answers = ["Paris", "William Shakespeare", "a rather long answer with several tokens"]
    batch = build_batch(tok, prompts, answers)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenize_pair(tok, prompt, answer)
        n, m = len(prompt_ids), len(answer_ids)
        length = int(batch["attention_mask"][row].sum())
        assert length == n + m - 1
        assert batch["input_ids"][row, :length].tolist() == prompt_ids + answer_ids[:-1]
        positions = (batch["labels"][row] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert positions == list(range(n - 1, n - 1 + m))
        assert batch["labels"][row, positions].tolist() == answer_ids
        for j in range(m - 1):
            assert batch["input_ids"][row, positions[j] + 1] == answer_ids[j]
        assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, length:] == 0).all()


def test_answers_get_exactly_one_leading_space(tok) -> None:
    spaced = build_batch(tok, ["The capital of France is"], [" Paris"])
    bare = build_batch(tok, ["The capital of France is"], ["Paris"])
    assert torch.equal(spaced["labels"], bare["labels"])
    assert bare["labels"][0, -1] == tok.convert_tokens_to_ids("ĠParis")
    assert tokenize_pair(tok, "x", "\tParis")[1] == tok("\tParis", add_special_tokens=False)["input_ids"]


def test_build_batch_does_not_touch_the_tokenizer(tok) -> None:
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    batch = build_batch(left, ["a b c d e f", "a"], ["x", "y"])
    assert left.padding_side == "left"
    assert batch["attention_mask"][1].tolist()[0] == 1 and batch["attention_mask"][1].tolist()[-1] == 0
    assert build_batch(tok, ["a"], ["b"], device="cpu")["input_ids"].device.type == "cpu"


class _DroppingTokenizer:
    """Tokenises prompts normally and answers to nothing, like a tokenizer that drops unknown symbols."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1, 2] if add_special_tokens else []}


def test_bad_inputs_raise_naming_the_index_and_field(tok) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        build_batch(tok, [], [])
    with pytest.raises(ValueError, match="differ in length"):
        build_batch(tok, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        build_batch(tok, ["a", "  "], ["x", "y"])
    with pytest.raises(ValueError, match=r"answers\[0\] is empty"):
        build_batch(tok, ["a"], [""])
    with pytest.raises(ValueError, match="single string"):
        build_batch(tok, "a prompt", ["x"])
    with pytest.raises(ValueError, match=r"answers\[0\] .* tokenises to zero tokens"):
        build_batch(_DroppingTokenizer(), ["a"], ["x"])


def test_micro_batches_cover_every_pair_and_validate_eagerly(tok) -> None:
    prompts = [f"Question number {i}?" for i in range(7)]
    answers = [f"answer {i}" for i in range(7)]
    parts = list(iter_micro_batches(tok, prompts, answers, 3))
    assert [list(indices) for indices, _ in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    whole = build_batch(tok, prompts, answers)
    for indices, batch in parts:
        width = batch["labels"].shape[1]
        assert torch.equal(batch["labels"], whole["labels"][list(indices), :width])
    with pytest.raises(ValueError, match=r"answers\[6\]"):
        iter_micro_batches(tok, prompts, answers[:6] + [""], 3)
    with pytest.raises(ValueError, match="micro-batch size"):
        iter_micro_batches(tok, prompts, answers, 0)
