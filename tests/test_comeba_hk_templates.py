"""Requests, token layout and context templates of COMEBA-HK / MEMIT-C."""
from __future__ import annotations

import pytest
import torch

from smedit_plugin.comeba_hk.compute_ks import template_batch
from smedit_plugin.comeba_hk.compute_z import _split_by_width, build_z_batch
from smedit_plugin.comeba_hk.templates import (TokenView, generate_context_templates, prepare_requests,
                                               template_weights)


def test_requests_split_around_the_subject() -> None:
    plain, placeholder, dict_target = prepare_requests([
        {"prompt": "Who wrote {x} for Hamlet?", "subject": "Hamlet", "target_new": "Marlowe"},
        {"prompt": "{} was born in", "subject": "Curie", "target_new": " Paris"},
        {"prompt": "Which city hosts Expo?", "subject": "Expo", "target_new": {"str": "Osaka"}},
    ])
    assert (plain.before, plain.subject, plain.after) == ("Who wrote {x} for ", "Hamlet", "?")
    assert plain.target_new == " Marlowe"
    assert (placeholder.before, placeholder.after, placeholder.prompt) == ("", " was born in", "Curie was born in")
    assert dict_target.target_new == " Osaka"
    with pytest.warns(UserWarning, match="more than once"):
        (twice,) = prepare_requests([{"prompt": "Bo met Bo again", "subject": "Bo", "target_new": "x"}])
    assert (twice.before, twice.after) == ("Bo met ", " again")
    for bad in ([], {"prompt": "a"}, [{"prompt": "", "subject": "a", "target_new": "b"}], ["text"]):
        with pytest.raises(ValueError):
            prepare_requests(bad)


def test_subject_last_index_and_target_positions(tiny) -> None:
    _, tok = tiny("smollm2", n_layers=2)
    view = TokenView(tok)
    requests = prepare_requests([{"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}])
    groups = [["{}"], ["Once upon a time. {}"]]
    seqs, last = template_batch(view, requests, groups)
    for seq, index in zip(seqs, last):
        assert tok.decode(seq[: index + 1]).endswith("France")
    batch = build_z_batch(view, requests, groups, torch.device("cpu"))
    target = view.encode_target(" Rome")
    for row, col, tid in zip(batch.target_rows.tolist(), batch.target_cols.tolist(), batch.target_ids.tolist()):
        ids = batch.ids[row, : batch.lengths[row]].tolist()
        assert tok.decode(ids[: col + 1]).rstrip().endswith(("is",) + tuple(tok.decode(t) for t in target))
        assert tid in target
    kl = batch.ids[batch.kl_rows[0], : batch.lengths[batch.kl_rows[0]]].tolist()
    assert tok.decode(kl) == "France is a" and tok.decode(kl[: batch.subject_last[batch.kl_rows[0]] + 1]) == "France"
    assert template_weights([["{}"], ["a {}", "b {}", "c {}"]]) == [0.5, 1 / 6, 1 / 6, 1 / 6]


def test_context_templates_are_seeded_and_leave_the_global_rng_alone(tiny) -> None:
    model, tok = tiny("smollm2", n_layers=2)
    state = torch.random.get_rng_state()
    first = generate_context_templates(model, tok, [[5, 3], [3, 2]], seed=0, device=torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == generate_context_templates(model, tok, [[5, 3], [3, 2]], seed=0, device=torch.device("cpu"))
    assert first != generate_context_templates(model, tok, [[5, 3], [3, 2]], seed=1, device=torch.device("cpu"))
    assert first[0] == ["{}"] and [len(g) for g in first] == [1, 3, 2]
    for template in first[1] + first[2]:
        assert template.endswith(". {}") and template.count("{") == 1 and template.count("}") == 1
    assert first[1][0].startswith("The") and first[1][1].startswith("Therefore")


def test_suffix_buckets_minimise_padding() -> None:
    groups = _split_by_width([3, 11, 4, 10, 3], [6, 6, 6, 6, 6], 3)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert len(groups) == 3 and set(groups[-1]) == {1, 3}
    assert _split_by_width([5, 5], [6, 6], 3) == [[0, 1]]
