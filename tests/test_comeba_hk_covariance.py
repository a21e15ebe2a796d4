"""Key statistics E[kk^T]: one padded pass equals per-document sums, caching, corpora, fingerprints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import smedit_plugin
from smedit_plugin.comeba_hk import covariance
from smedit_plugin.comeba_hk.covariance import (collect_second_moments, corpus_id, corpus_path, model_fingerprint,
                                                read_documents, second_moments)
from smedit_plugin.comeba_hk.state import STATE_NAME_PARTS, attach_state
from smedit_plugin.testing import tiny_model

DOCS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
        "A", "Edits should stay local to their subject, said nobody in particular, twice over.",
        "Consecutive editing keeps every earlier key in the accumulated covariance."]
NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama3", n_layers=3)


def _modules(model) -> dict[str, torch.nn.Module]:
    return {name: model.get_submodule(name) for name in NAMES}


def test_one_padded_pass_equals_per_document_sums(tiny) -> None:
    model, tok = tiny
    mods = _modules(model)
    collected = collect_second_moments(model, tok, mods, mods[NAMES[-1]], DOCS, max_len=12, dtype=torch.float64)
    expected = {name: torch.zeros(128, 128, dtype=torch.float64) for name in NAMES}
    count = 0
    for doc in DOCS:
        ids = torch.tensor([tok(doc)["input_ids"][:12]])
        keys = {}
        handles = [m.register_forward_pre_hook(lambda _m, a, n=n: keys.__setitem__(n, a[0][0].double()))
                   for n, m in mods.items()]
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
        for name in NAMES:
            expected[name] += keys[name].T @ keys[name]
        count += ids.shape[1]
    for name in NAMES:
        total, n = collected[name]
        assert n == count
        assert torch.allclose(total, expected[name], rtol=1e-4, atol=1e-7), (total - expected[name]).abs().max()


def test_statistics_are_cached_per_fingerprint_and_corpus(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    mods = _modules(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    kwargs = dict(dataset=str(corpus), n_samples=10, max_len=16, dtype=torch.float32, stats_dir=str(tmp_path / "stats"),
                  fingerprint=model_fingerprint(model))
    first = second_moments(model, tok, mods, mods[NAMES[-1]], **kwargs)
    files = sorted((tmp_path / "stats").rglob("*.safetensors"))
    assert len(files) == 2
    totals = collect_second_moments(model, tok, mods, mods[NAMES[-1]], read_documents(corpus, 10), 16, torch.float32)
    for name in NAMES:
        assert torch.allclose(first[name], totals[name][0] / totals[name][1])

    def no_pass(*args, **kw):
        raise AssertionError("statistics should come from the cache")

    monkeypatch.setattr(covariance, "collect_second_moments", no_pass)
    again = second_moments(model, tok, mods, mods[NAMES[-1]], **kwargs)
    assert all(torch.equal(first[n], again[n]) for n in NAMES)
    corpus.write_text("A different corpus.\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="cache"):
        second_moments(model, tok, mods, mods[NAMES[-1]], **kwargs)


def test_corpus_files_and_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one\n\n  two  \nthree\n \nfour\n", encoding="utf-8")
    assert read_documents(path, 10) == ["one", "two", "three", "four"]
    subset = read_documents(path, 2)
    assert len(subset) == 2 and subset == read_documents(path, 2)
    assert subset == [d for d in ["one", "two", "three", "four"] if d in subset]
    before = corpus_id(path)
    path.write_text("one\n", encoding="utf-8")
    assert corpus_id(path) != before and corpus_id(path).startswith("c-")
    with pytest.raises(FileNotFoundError, match="mom2_dataset"):
        corpus_path(str(tmp_path / "missing.txt"))
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bundled = corpus_path("wikitext-2")
    # the corpus ships inside the package (no ../shared, no copy into the cache)
    assert bundled.is_relative_to(Path(smedit_plugin.__file__).parent) and bundled.stat().st_size > 10**6
    if SHARED_TEXT.is_file():  # the packaged copy is the project's WikiText-2 test split, unchanged
        assert bundled.read_bytes() == SHARED_TEXT.read_bytes()
    assert not (tmp_path / "cache").exists()


def test_fingerprint_ignores_hook_state_but_not_weights(tiny) -> None:
    model, _ = tiny
    model = __import__("copy").deepcopy(model)
    before = model_fingerprint(model, skip=STATE_NAME_PARTS)
    info = {"alg_name": "COMEBA-HK", "layers": [0, 1], "rewrite_modules": NAMES, "templates": [["{}"]],
            "bos_id": None, "fingerprint": before}
    attach_state(model, info, [torch.eye(128) for _ in NAMES], 2.2, 1, True, True)
    assert model_fingerprint(model, skip=STATE_NAME_PARTS) == before
    assert model_fingerprint(model) != before
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(model, skip=STATE_NAME_PARTS) != before
