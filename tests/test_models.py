"""Model loading, the GGUF conversion cache, tiny real-depth models and edit-module lookup."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from smedit_plugin import gguf_convert
from smedit_plugin.fileio import cache_dir
from smedit_plugin.gguf_convert import ensure_converted, spm_bpe_merges
from smedit_plugin.edit_modules import resolve_edit_modules, weight_shape_in_out
from smedit_plugin.models import ARCHITECTURES, load_model_and_tokenizer
from smedit_plugin.testing import TINY_ARCHS
from smedit_plugin.tfcompat import transformers_version


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_tiny_stand_in_has_the_real_depth_and_every_module_template(key: str, tiny) -> None:
    info = ARCHITECTURES[key]
    model, tok = tiny(info.tiny_arch)
    assert TINY_ARCHS[info.tiny_arch].depth == info.n_layers == model.config.num_hidden_layers
    assert type(model).__name__ == TINY_ARCHS[info.tiny_arch].model_class
    names = dict(model.named_modules())
    assert info.module_name("layer", info.n_layers - 1) in names
    assert info.modules["layer"].format(i=info.n_layers) not in names
    for role in ("final_norm", "lm_head"):
        assert info.module_name(role) in names
    linear_roles = [r for r in info.modules if r not in ("layer", "final_norm", "lm_head")]
    assert linear_roles
    wanted = [info.module_name(r, i) for r in linear_roles for i in (0, info.n_layers - 1)]
    resolved = resolve_edit_modules(model, wanted)
    assert [n for n, _ in resolved] == wanted
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_module_name_rejects_unknown_roles_and_out_of_range_layers() -> None:
    info = ARCHITECTURES["llama3-8b"]
    assert info.module_name("gate", 11) == "model.layers.11.mlp.gate_proj"
    with pytest.raises(ValueError, match="fc_in"):
        info.module_name("fc_in", 3)
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        info.module_name("up", 32)


def test_tiny_model_is_seeded_without_touching_the_global_rng(tiny) -> None:
    state = torch.random.get_rng_state()
    a, _ = tiny("llama3", n_layers=2, seed=1)
    b, _ = tiny("llama3", n_layers=2, seed=1)
    c, _ = tiny("llama3", n_layers=2, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert a.config.num_hidden_layers == 2 and not a.training
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny("gpt-5")
    with pytest.raises(ValueError, match="n_layers"):
        tiny("llama3", n_layers=0)


def test_resolve_edit_modules_names_what_is_wrong(tiny) -> None:
    model, _ = tiny("smollm2", n_layers=2)
    resolved = resolve_edit_modules(model, ["model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.down_proj"])
    assert [n for n, _ in resolved] == ["model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert resolved[0][1] is model.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_prj'.*closest names: model\.layers\.1\.mlp\.up_proj"):
        resolve_edit_modules(model, ["model.layers.1.mlp.up_prj"])
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj' does not exist"):
        resolve_edit_modules(model, ["model.layers.7.mlp.up_proj"])
    with pytest.raises(ValueError, match="is a LlamaMLP; only nn.Linear and Conv1D"):
        resolve_edit_modules(model, ["model.layers.1.mlp"])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_edit_modules(model, ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_edit_modules(model, [])


def test_weight_shape_in_out_follows_the_storage_convention() -> None:
    from transformers.pytorch_utils import Conv1D

    assert weight_shape_in_out(nn.Linear(3, 5)) == (3, 5)
    conv = Conv1D(5, 3)
    assert tuple(conv.weight.shape) == (3, 5)
    assert weight_shape_in_out(conv) == (3, 5)
    x = torch.randn(2, 3)
    assert conv(x).shape == nn.Linear(3, 5)(x).shape == (2, 5)
    with pytest.raises(ValueError, match="Embedding"):
        weight_shape_in_out(nn.Embedding(4, 3))


def test_cache_dir_follows_smedit_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    major = transformers_version().major
    assert gguf_convert.converted_model_dir("smollm2-135m") == tmp_path / "c" / "models" / f"smollm2-135m-transformers{major}"
    monkeypatch.delenv("SMEDIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "smedit"


def test_load_from_a_local_folder_applies_dtype_eval_mode_and_pad_token(tiny, tmp_path: Path) -> None:
    model, tok = tiny("llama3", n_layers=2)
    tok.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path / "m"), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not loaded.training
    assert loaded_tok.pad_token is not None and loaded_tok.pad_token == loaded_tok.eos_token
    same, _ = load_model_and_tokenizer(str(tmp_path / "m"))
    assert {p.dtype for p in same.parameters()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer(str(tmp_path / "m"), dtype="float8")


def test_unknown_packaged_name_and_empty_name_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a packaged model"):
        ensure_converted("smollm3")
    with pytest.raises(ValueError, match="non-empty string"):
        load_model_and_tokenizer("  ")


def test_failed_conversion_leaves_no_partial_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))

    def broken(workdir: Path):
        (workdir / "half-written.gguf").write_bytes(b"GGUF")
        raise OSError("disk full")

    monkeypatch.setitem(gguf_convert.PRETRAINED, "smollm2-135m", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_converted("smollm2-135m")
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_outdated_conversions_are_redone_once(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))
    target = gguf_convert.converted_model_dir("smollm2-135m")
    target.mkdir(parents=True)
    (target / "smedit_source.json").write_text('{"name": "smollm2-135m"}')
    calls = []

    def fake_convert(name: str, folder: Path) -> None:
        calls.append(name)
        (folder / "smedit_source.json").write_text(json.dumps({"format": gguf_convert.CACHE_FORMAT,
                                                               "transformers": str(transformers_version())}))

    monkeypatch.setattr(gguf_convert, "_convert_gguf", fake_convert)
    assert ensure_converted("smollm2-135m") == target
    assert ensure_converted("smollm2-135m") == target
    assert calls == ["smollm2-135m"]


def test_spm_bpe_merges_rank_pairs_by_the_merged_piece_score() -> None:
    from tokenizers import Tokenizer, models as tk_models

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    scores = {"ab": -3.0, "abc": -4.0, "bc": -5.0}
    merges = spm_bpe_merges(vocab, scores)
    assert merges == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]
    bpe = Tokenizer(tk_models.BPE(vocab=vocab, merges=merges))
    assert bpe.encode("abc").tokens == ["abc"]
    assert bpe.encode("bcb").tokens == ["bc", "b"]


@pytest.mark.slow
def test_smollm2_gguf_converts_into_a_plain_checkpoint_on_this_transformers(monkeypatch, tmp_path: Path,
                                                                             smollm2) -> None:
    """Always a fresh conversion (an empty cache), so CI converts under each transformers it runs."""
    monkeypatch.setenv("SMEDIT_CACHE", str(tmp_path))
    folder = ensure_converted("smollm2-135m")
    assert folder.is_relative_to(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    marker = json.loads((folder / "smedit_source.json").read_text())
    assert marker["transformers"] == str(transformers_version())
    model, _ = load_model_and_tokenizer("smollm2-135m", device="cpu")
    reference, _ = smollm2  # the session's copy, converted earlier or by another run
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_smollm2_tokenizer_uses_the_gguf_special_tokens(smollm2) -> None:
    _, tok = smollm2
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] != tok.bos_token_id
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("ĠParis")]


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2) -> None:
    model, tok = smollm2
    assert model.config.num_hidden_layers == ARCHITECTURES["smollm2-135m"].n_layers
    assert model.config.hidden_size == ARCHITECTURES["smollm2-135m"].hidden_size
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    continuation = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert continuation.startswith(" Paris"), continuation


@pytest.mark.slow
def test_gemma3_tokenizer_is_rebuilt_as_sentencepiece_bpe() -> None:
    from smedit_plugin.models import load_tokenizer

    tok = load_tokenizer("gemma-3-270m")
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False)["input_ids"]) == ["▁Paris"]
    text = "Ünïcödé 日本語\n\nnew  line"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert "token_type_ids" not in tok("x")
