"""Hypernetwork archives: round trip, strict compatibility, clear errors, resume, no pickle, atomic replace."""
from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from smedit_plugin.records import load_records
from smedit_plugin.hypernet import archive as archive_module
from smedit_plugin.hypernet.editor import apply_steps
from smedit_plugin.hypernet.archive import ArchiveError, archive_folder, load_archive, read_meta, save_archive
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.hypernet.training import train_hypernet
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.malmen2.main import apply_malmen2_to_model
from smedit_plugin.smedit.hparams import SMEditHyperParams

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
SMALL = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3,
             n_edits=2, micro_batch_size=2, chunk_size=3, max_steps=1)
PROMPTS = ["The capital of France is", "The CEO of Apple is"]
TARGETS = ["Rome", "Satya Nadella"]


@pytest.fixture(scope="module")
def tiny4(tiny):
    """One random 4-layer SmolLM2-shaped model per module; tests edit deep copies of it."""
    return tiny("smollm2", n_layers=4)


def trained_looking(editor: HypernetEditor, seed: int) -> HypernetEditor:
    """Non-default values in every parameter and normaliser buffer, as after real training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
        for nets in editor.nets:
            for net in nets.values():
                net.update_normaliser(torch.randn(7, net.key_size, generator=gen),
                                      torch.randn(7, net.value_size, generator=gen))
    return editor


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("hp", [MALMEN2HyperParams(**SMALL), SMEditHyperParams(**{**SMALL, "num_seq": 2})],
                         ids=["malmen2-shared", "smedit-seq-step-specific"])
def test_round_trip_gives_bit_identical_shifts(tiny4, tmp_path, hp) -> None:
    model, tok = tiny4
    editor = trained_looking(HypernetEditor(model, hp), seed=1)
    save_archive(tmp_path / "arch", editor, model_name="tiny-smollm2")
    loaded, meta = load_archive(tmp_path / "arch", model, hp)

    assert loaded is not editor and meta["structure"] == editor.describe() and meta["alg_name"] == hp.alg_name
    assert meta["num_seq"] == hp.num_seq and meta["model_name"] == "tiny-smollm2"
    saved = editor.nets.state_dict()
    assert set(loaded.nets.state_dict()) == set(saved)
    for key, value in loaded.nets.state_dict().items():
        assert torch.equal(value, saved[key]), key
    original = weights_of(model)
    edited = []
    for ed in (editor, loaded):
        twin = copy.deepcopy(model)
        ed.bind(twin)
        apply_steps(twin, tok, ed, PROMPTS, TARGETS)
        edited.append(weights_of(twin))
    for name in original:
        assert torch.equal(edited[0][name], edited[1][name]), name
        assert torch.equal(edited[0][name], original[name]) == (name.removesuffix(".weight") not in MODULES)


def test_mismatched_archive_is_rejected_listing_what_differs(tiny4, tmp_path) -> None:
    model, _ = tiny4
    hp = MALMEN2HyperParams(**SMALL)
    path = save_archive(tmp_path / "arch", HypernetEditor(model, hp), model_name="tiny-smollm2")
    other_layer = MODULES[:2] + ["model.layers.3.mlp.down_proj"]
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    cases = [
        (model, hp.replace(edit_modules=other_layer), ["edit_modules: archive", "model.layers.3.mlp.down_proj"]),
        (model, hp.replace(rank=8), ["ranks: archive [4, 4], model/hparams [8, 8]"]),
        (model, SMEditHyperParams(**SMALL), ["method: archive 'MALMEN2', hparams 'SMEdit'"]),
        (wider, hp, ["shapes: archive [[64, 128], [64, 128], [128, 64]], model/hparams [[64, 96], [64, 96], [96, 64]]"]),
        (model, SMEditHyperParams(**{**SMALL, "rank": 2, "n_blocks": 3}),
         ["method: archive 'MALMEN2'", "ranks: archive [4, 4], model/hparams [2, 2]", "n_blocks: archive 2"]),
    ]
    before = weights_of(model)
    for live_model, live_hp, needles in cases:
        with pytest.raises(ArchiveError) as err:
            load_archive(path, live_model, live_hp)
        message = str(err.value)
        assert str(path) in message
        for needle in needles:
            assert needle in message, (needle, message)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_missing_or_unset_archive_is_a_clear_error(tiny4, tmp_path) -> None:
    model, tok = tiny4
    hp = MALMEN2HyperParams(**SMALL)
    with pytest.raises(ArchiveError, match="no hypernetwork archive at .*expected manifest.json naming meta.json and hypernet.safetensors"):
        load_archive(tmp_path / "nowhere", model, hp)
    request = [{"prompt": PROMPTS[0], "target_new": TARGETS[0], "ground_truth": "Paris", "portability": {}, "locality": {}}]
    before = weights_of(model)
    with pytest.raises(ArchiveError, match="set `archive:` in the hparams"):
        apply_malmen2_to_model(model, tok, request, hp, return_orig_weights=True)
    with pytest.raises(ArchiveError, match="no hypernetwork archive"):
        apply_malmen2_to_model(model, tok, request, hp.replace(archive=str(tmp_path / "nowhere")))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_corrupt_archives_raise_archive_errors(tiny4, tmp_path) -> None:
    model, _ = tiny4
    hp = MALMEN2HyperParams(**SMALL)
    path = save_archive(tmp_path / "arch", HypernetEditor(model, hp), model_name="tiny-smollm2")
    meta_file = archive_folder(path) / "meta.json"
    good = meta_file.read_text()
    meta_file.write_text(json.dumps({**json.loads(good), "format": "something-else/9"}))
    with pytest.raises(ArchiveError, match="meta.json fails its checksum"):
        load_archive(path, model, hp)
    meta_file.write_text(good)
    load_archive(path, model, hp)
    weights = archive_folder(path) / "hypernet.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    archive_module.save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    with pytest.raises(ArchiveError, match="hypernet.safetensors fails its checksum"):
        load_archive(path, model, hp)


def test_archive_holds_only_safetensors_and_json(tiny4, tmp_path) -> None:
    model, _ = tiny4
    hp = MALMEN2HyperParams(**SMALL)
    editor = HypernetEditor(model, hp)
    opt = torch.optim.Adam(editor.unique_parameters(), lr=hp.meta_lr)
    for p in editor.unique_parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    path = save_archive(tmp_path / "arch", editor, model_name="tiny-smollm2", optimizer=opt)
    assert sorted(p.name for p in path.iterdir()) == [".smedit-lock", "manifest.json", "v-000001"]
    path = archive_folder(path)
    assert sorted(p.name for p in path.iterdir()) == ["hypernet.safetensors", "meta.json", "optimizer.safetensors",
                                                      "version.json"]
    json.loads((path / "version.json").read_text(encoding="utf-8"))
    json.loads((path / "meta.json").read_text(encoding="utf-8"))
    for name in ("hypernet.safetensors", "optimizer.safetensors"):
        head = (path / name).read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"PK")  # neither a pickle nor a torch.save zip
        with safe_open(str(path / name), framework="pt") as f:
            assert len(list(f.keys())) > 0
    tree = ast.parse(Path(archive_module.__file__).read_text(encoding="utf-8"))
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not called & {"torch.load", "torch.save", "pickle.load", "pickle.loads", "pickle.dump"}
    assert "pickle" not in imported and {"load_file", "save_file"} <= called


def test_failed_save_keeps_the_previous_archive(tiny4, tmp_path, monkeypatch) -> None:
    model, _ = tiny4
    hp = MALMEN2HyperParams(**SMALL)
    first = trained_looking(HypernetEditor(model, hp), seed=2)
    path = save_archive(tmp_path / "arch", first, model_name="tiny-smollm2")
    second = trained_looking(HypernetEditor(model, hp), seed=3)
    save_archive(path, second, model_name="tiny-smollm2")  # replacing an archive works
    kept = load_file(str(archive_folder(path) / "hypernet.safetensors"))
    assert torch.equal(kept["0.(64, 128).lr.weight"], second.nets.state_dict()["0.(64, 128).lr.weight"])

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(archive_module, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_archive(path, trained_looking(HypernetEditor(model, hp), seed=4), model_name="tiny-smollm2")
    after = load_file(str(archive_folder(path) / "hypernet.safetensors"))
    assert after.keys() == kept.keys() and all(torch.equal(after[k], kept[k]) for k in kept)
    assert read_meta(path)["alg_name"] == "MALMEN2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch"]  # no temporary directories left behind
    assert sorted(p.name for p in path.iterdir()) == [".smedit-lock", "manifest.json", "v-000002"]


def test_resume_after_two_units_equals_one_run(tiny4, tmp_path, zsre_train_path) -> None:
    model, tok = tiny4
    records = load_records(zsre_train_path, dataset="zsre", limit=8)
    hp = MALMEN2HyperParams(**{**SMALL, "alg_name": "MALMEN1", "loc_coef": 0.0, "max_steps": 3, "seed": 5})
    one = train_hypernet(copy.deepcopy(model), tok, hp, records, tmp_path / "one", progress=False)
    assert one.state.units_done == 3 and one.state.optimizer_steps == 3

    resumed_model = copy.deepcopy(model)
    part = train_hypernet(resumed_model, tok, hp.replace(max_steps=2), records, tmp_path / "resumed", progress=False)
    assert part.state.units_done == 2 and read_meta(tmp_path / "resumed")["train_state"]["units_done"] == 2
    after_two = load_file(str(archive_folder(tmp_path / "resumed") / "hypernet.safetensors"))
    rest = train_hypernet(resumed_model, tok, hp, records, tmp_path / "resumed", progress=False)
    assert rest.state.units_done == 3 and rest.state.optimizer_steps == 3 and rest.edits_seen == 2

    for name in ("hypernet.safetensors", "optimizer.safetensors"):
        want = load_file(str(archive_folder(tmp_path / "one") / name))
        got = load_file(str(archive_folder(tmp_path / "resumed") / name))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    final = load_file(str(archive_folder(tmp_path / "one") / "hypernet.safetensors"))
    assert not torch.equal(final["0.(64, 128).lr.weight"], after_two["0.(64, 128).lr.weight"])  # unit 3 trained
