"""Hostile but realistic use (issue 14): bad inputs and injected faults on tiny models.

Every case asserts that the error names what is wrong, that every parameter is bit-identical to
before, that no hook is left on the model, and (where files exist) that the files written before
still load to the same tensors.
"""
from __future__ import annotations

import copy
import errno
import json
import math
import pathlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from smedit_plugin import cli, fileio
from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model, load_hook_state, save_hook_state
from smedit_plugin.comeba_hk import main as comeba_main
from smedit_plugin.comeba_hk import state as state_module
from smedit_plugin.comeba_hk.state import StateError, find_state, remove_hook_layers
from smedit_plugin.records import load_records, sample_path
from smedit_plugin.errors import HyperParamsError, NonFiniteUpdateError
from smedit_plugin.hparams import load_hparams
from smedit_plugin.hypernet import archive as archive_module
from smedit_plugin.hypernet import editor as editor_module
from smedit_plugin.hypernet.archive import ArchiveError, archive_folder, load_archive, read_meta, save_archive
from smedit_plugin.hypernet.cache import ModuleCache, cache_keys_and_value_grads
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.hypernet.training import train_hypernet
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.malmen2.main import apply_malmen2_to_model
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.smedit.hparams import SMEditHyperParams
from smedit_plugin.smedit.main import apply_smedit_to_model
from smedit_plugin.text import build_batch

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
SMALL = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3,
             micro_batch_size=2, chunk_size=3, n_edits=2)
LLAMA = dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
             mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
             ln_f_module="model.norm", lm_head_module="lm_head")
REQUESTS = [
    {"prompt": "The name of the capital city of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Which family does Ramalinaceae belong to?", "subject": "Ramalinaceae", "target_new": "Lamiinae"},
]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


pytestmark = pytest.mark.usefixtures("direct_call_semantics")


@pytest.fixture(scope="module")
def tiny4(tiny):
    return tiny("smollm2", n_layers=4)


@pytest.fixture()
def model(tiny4) -> nn.Module:
    return copy.deepcopy(tiny4[0])


@pytest.fixture()
def tok(tiny4):
    return tiny4[1]


# -- helpers ---------------------------------------------------------------------------------

def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same parameter names, every one bit-identical, no COMEBA-HK state and no forward hook anywhere."""
    now = dict(model.named_parameters())
    assert set(now) == set(before)
    for name, value in before.items():
        assert torch.equal(now[name], value), name
    assert find_state(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def entries(folder: Path) -> list[str]:
    """A saved folder's entries without the writer lock the plugin keeps beside them."""
    return sorted(p.name for p in folder.iterdir() if p.name not in fileio.BOOKKEEPING)


def tensors_of(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_archive(model: nn.Module, tok, hp, path: Path, seed: int = 1, **save_kwargs: Any):
    """An editor as training leaves it (normaliser statistics of real rows, weights off their init), saved."""
    editor = HypernetEditor(model, hp)
    pairs = [(n, model.get_submodule(n)) for n in MODULES]
    caches = cache_keys_and_value_grads(model, pairs, [build_batch(tok, [r["prompt"] for r in REQUESTS],
                                                                   [r["target_new"] for r in REQUESTS])])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        for step in range(len(editor.nets)):
            for pos, name in enumerate(MODULES):
                editor.net_for(step, pos).update_normaliser(caches[name].keys, caches[name].value_grads)
    save_archive(path, editor, model_name="tiny-smollm2", **save_kwargs)
    return editor, hp.replace(archive=str(path))


def rewrite_published(path: Path, name: str, change: Callable[[Path], None]) -> None:
    """Change a file of the published version and re-sign the manifest: a well-formed but wrong file."""
    manifest = json.loads((path / fileio.MANIFEST).read_text())
    file = path / manifest["version"] / name
    change(file)
    if file.exists():
        manifest["files"][name] = {"sha256": fileio.sha256_of(file), "bytes": file.stat().st_size}
    else:
        manifest["files"].pop(name)
    (path / fileio.MANIFEST).write_text(json.dumps(manifest))


def edit_json(key: str, value: Any) -> Callable[[Path], None]:
    def change(file: Path) -> None:
        data = json.loads(file.read_text())
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
        file.write_text(json.dumps(data))
    return change


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def change(file: Path) -> None:
        tensors = load_file(str(file))
        fn(tensors)
        save_file(tensors, str(file))
    return change


_DROP = object()


def chp(**changes: Any) -> COMEBAHKHyperParams:
    base = dict(model_name="tiny-smollm2", layers=[1, 2], v_loss_layer=3, v_num_grad_steps=4, clamp_norm_factor=4.0,
                mom2_adjustment=False, mom2_update_weight=10.0, context_template_length_params=[[4, 2]], **LLAMA)
    base.update(changes)
    return COMEBAHKHyperParams(**base)


@pytest.fixture()
def smedit_archive(model, tok, tmp_path):
    """(hparams with ``archive`` set, the archive's weights) for SMEdit with 2 BP steps and one shared network."""
    _, hp = make_archive(model, tok, SMEditHyperParams(**SMALL), tmp_path / "arch")
    return hp, tensors_of(archive_folder(tmp_path / "arch"), archive_module.WEIGHTS)


@pytest.fixture(params=["COMEBA-HK", "MEMIT-C"])
def saved_state(request, tiny4, tmp_path):
    """A state saved after one edit of a copy of the model: (folder, its tensors, hparams)."""
    edited = copy.deepcopy(tiny4[0])
    hp = chp(alg_name=request.param)
    apply_comeba_hk_to_model(edited, tiny4[1], REQUESTS, hp)
    folder = save_hook_state(edited, tmp_path / "state")
    return folder, tensors_of(fileio.current_version(folder, state_module.STATE_FORMAT, StateError),
                              state_module.STATE_TENSORS), hp


# ============================================================================================
# bad inputs
# ============================================================================================

BAD_HPARAMS = [
    (SMEditHyperParams, {"lr": math.nan}, "'lr'"),
    (SMEditHyperParams, {"lr": math.inf}, "'lr'"),
    (SMEditHyperParams, {"lr": "nan"}, "'lr'"),
    (SMEditHyperParams, {"lr": -1.0}, "'lr'"),
    (SMEditHyperParams, {"meta_lr": math.nan}, "'meta_lr'"),
    (SMEditHyperParams, {"meta_lr": -math.inf}, "'meta_lr'"),
    (SMEditHyperParams, {"max_grad_norm": math.nan}, "'max_grad_norm'"),
    (SMEditHyperParams, {"reg_coef": math.inf}, "'reg_coef'"),
    (SMEditHyperParams, {"bp_steps": 0}, "'bp_steps'"),
    (SMEditHyperParams, {"bp_steps": 17}, "'bp_steps'"),
    (SMEditHyperParams, {"rank": 0}, "'rank'"),
    (SMEditHyperParams, {"n_blocks": 0}, "'n_blocks'"),
    (SMEditHyperParams, {"chunk_size": 0}, "'chunk_size'"),
    (SMEditHyperParams, {"micro_batch_size": 0}, "'micro_batch_size'"),
    (SMEditHyperParams, {"n_edits": 0}, "'n_edits'"),
    (SMEditHyperParams, {"num_seq": 0}, "'num_seq'"),
    (SMEditHyperParams, {"max_steps": 0}, "'max_steps' = 0"),
    (SMEditHyperParams, {"max_steps": -2}, "'max_steps'"),
    (SMEditHyperParams, {"seed": -1}, "'seed'"),
    (SMEditHyperParams, {"batch_size": 0}, "'batch_size'"),
    (SMEditHyperParams, {"max_length": 4}, "'max_length'"),
    (SMEditHyperParams, {"val_interval": -1}, "'val_interval'"),
    (SMEditHyperParams, {"edit_modules": []}, "'edit_modules'"),
    (MALMEN2HyperParams, {"loc_coef": -math.inf}, "'loc_coef'"),
    (RLEdit2HyperParams, {"discount": 1.5}, "'discount'"),
    (RLEdit2HyperParams, {"time_decay": math.nan}, "'time_decay'"),
    (RLEdit2HyperParams, {"back_depth": 0}, "'back_depth'"),
    (COMEBAHKHyperParams, {"alpha_z": -1.0}, "'alpha_z'"),
    (COMEBAHKHyperParams, {"alpha_z": math.nan}, "'alpha_z'"),
    (COMEBAHKHyperParams, {"alpha_z": math.inf}, "'alpha_z'"),
    (COMEBAHKHyperParams, {"mom2_update_weight": math.nan}, "'mom2_update_weight'"),
    (COMEBAHKHyperParams, {"mom2_update_weight": -1.0}, "'mom2_update_weight'"),
    (COMEBAHKHyperParams, {"v_lr": math.inf}, "'v_lr'"),
    (COMEBAHKHyperParams, {"cov_shrinkage": 2.0}, "'cov_shrinkage'"),
    (COMEBAHKHyperParams, {"clamp_norm_factor": math.nan}, "'clamp_norm_factor'"),
    (COMEBAHKHyperParams, {"kl_factor": -1.0}, "'kl_factor'"),
    (COMEBAHKHyperParams, {"ddof": 2}, "'ddof'"),
    (COMEBAHKHyperParams, {"mom2_n_samples": 0}, "'mom2_n_samples'"),
    (COMEBAHKHyperParams, {"layers": [2, 1]}, "'layers'"),
    (COMEBAHKHyperParams, {"v_loss_layer": 1}, "'v_loss_layer'"),
    (COMEBAHKHyperParams, {"seed": -1}, "'seed'"),
    (COMEBAHKHyperParams, {"cov_ridge": math.inf}, "'cov_ridge'"),
]


def _valid(cls) -> dict[str, Any]:
    return chp().to_dict() if cls is COMEBAHKHyperParams else cls(**SMALL).to_dict()


@pytest.mark.parametrize("cls,changes,needle", BAD_HPARAMS,
                         ids=[f"{c.__name__[:-11]}-{next(iter(ch))}={ch[next(iter(ch))]!r}" for c, ch, _ in BAD_HPARAMS])
def test_finding5_bad_hparams_values_are_refused_naming_the_field(cls, changes, needle, tmp_path) -> None:
    with pytest.raises(HyperParamsError) as err:
        cls.from_dict({**_valid(cls), **changes}, source="my.yaml")
    assert needle in str(err.value) and "my.yaml" in str(err.value)
    # the same through a YAML file, where NaN and inf are spelt .nan / .inf
    key, value = next(iter(changes.items()))
    if isinstance(value, float) and not math.isfinite(value):
        text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in _valid(cls).items() if k != key and v is not None)
        spelt = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        (tmp_path / "hp.yaml").write_text(f"{text}\n{key}: {spelt}\n")
        with pytest.raises(HyperParamsError, match=f"'{key}'.*finite"):
            load_hparams(tmp_path / "hp.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_finding6_duplicate_keys_are_refused_with_the_line(tmp_path, suffix) -> None:
    good = SMEditHyperParams(**SMALL).to_dict()
    if suffix == ".yaml":
        lines = [f"{k}: {json.dumps(v)}" for k, v in good.items() if v is not None]
        first = next(i for i, line in enumerate(lines) if line.startswith("lr:")) + 1
        lines.append("lr: 0.5")
        (tmp_path / "hp.yaml").write_text("\n".join(lines) + "\n")
        needle = f"line {len(lines)}: key 'lr' is given twice (first on line {first})"
    else:
        body = json.dumps(good)[:-1] + ', "lr": 0.5}'
        (tmp_path / "hp.json").write_text(body)
        needle = "'lr' given twice"
    with pytest.raises(HyperParamsError) as err:
        load_hparams(tmp_path / f"hp{suffix}")
    assert needle in str(err.value) and f"hp{suffix}" in str(err.value)


def _no_model_load(monkeypatch) -> None:
    import smedit_plugin.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_model_and_tokenizer", refuse)


BAD_FLAGS = [
    (["train", "TRAINING/SMEdit/smollm2-135m", "--data", "x.json", "--out", "o", "--max-steps", "0"], "--max-steps"),
    (["train", "TRAINING/SMEdit/smollm2-135m", "--data", "x.json", "--out", "o", "--max-steps", "-3"], "--max-steps"),
    (["compare", "--eval-data", "e.json", "--protocol", "consecutive", "--methods", "COMEBA-HK", "--batch-size", "0"],
     "--batch-size"),
    (["compare", "--eval-data", "e.json", "--n-edits", "0"], "--n-edits"),
    (["compare", "--eval-data", "e.json", "--protocol", "sequential", "--num-seq", "0"], "--num-seq"),
    (["compare", "--eval-data", "e.json", "--methods", ""], "--methods"),
    (["compare", "--eval-data", "e.json", "--methods", " , "], "--methods"),
    (["compare", "--eval-data", "e.json", "--curve-every", "-1"], "--curve-every"),
    (["base-eval", "--batch-size", "0"], "--batch-size"),
    (["base-eval", "--limit", "0"], "--limit"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_finding6_bad_cli_flags_are_refused_before_the_model_loads(argv, flag, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    assert cli.main(argv) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("what", ["file", "folder"])
def test_finding1_train_out_is_refused_before_the_model_loads(what, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    if what == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    assert cli.main(["train", "TRAINING/SMEdit/smollm2-135m", "--data", "x.json", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ("--overwrite" in err if what == "folder" else "existing file where a folder goes" in err)
    assert (out.read_text() if what == "file" else (out / "notes.txt").read_text()) == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden .out.old


LONG = "word " * 80
BAD_REQUESTS = [
    ([], "non-empty list"),
    ([{"prompt": "a"}], "'target_new'"),
    (["just a string"], "request 0 must be a dict"),
    ([{"prompt": LONG + "is", "target_new": "x"}], "request 0 ("),
    ([{"prompt": "The sky is", "target_new": "green", "locality": "nope"}], "field 'locality' must be a dict"),
    ([{"prompt": "The sky is", "target_new": "green", "locality": {"nq": {"prompt": "q"}}}], "locality['nq']"),
    ([{"prompt": "The sky is", "target_new": "green", "locality": {"nq": {"prompt": 3, "ground_truth": "a"}}}],
     "locality['nq']"),
    ([{"prompt": "The sky is", "target_new": "green",
       "locality": {"nq": {"prompt": ["a", "b"], "ground_truth": ["x"]}}}], "2 prompts but 1 ground truths"),
    ([{"prompt": "The sky is", "target_new": "green", "locality": {"nq": "a"}}], "locality['nq']"),
]


@pytest.mark.parametrize("requests,needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_finding6_bad_requests_to_a_hypernetwork_method_are_refused(model, tok, smedit_archive, requests, needle) -> None:
    hp, _ = smedit_archive
    before = params_of(model)
    with pytest.raises(ValueError) as err:
        apply_smedit_to_model(model, tok, requests, hp)
    assert needle in str(err.value)
    assert_untouched(model, before)


BAD_LOCATE_REQUESTS = [
    ([{**REQUESTS[0], "prompt": LONG + "France is"}], "max_length = 64"),
    ([{**REQUESTS[0], "locality": {"nq": {"prompt": "a"}}}], "locality['nq']"),
    ([{**REQUESTS[0], "subject": "Spain"}], "does not occur in prompt"),
    ([{k: v for k, v in REQUESTS[0].items() if k != "subject"}], "'subject'"),
]


@pytest.mark.parametrize("requests,needle", BAD_LOCATE_REQUESTS, ids=[n for _, n in BAD_LOCATE_REQUESTS])
def test_finding6_bad_requests_to_comeba_hk_are_refused(model, tok, requests, needle) -> None:
    before = params_of(model)
    with pytest.raises(ValueError) as err:
        apply_comeba_hk_to_model(model, tok, requests, chp())
    assert needle in str(err.value)
    assert_untouched(model, before)


def test_finding6_contradictory_facts_in_one_batch_are_warned_about(model, tok, smedit_archive) -> None:
    hp, _ = smedit_archive
    twice = [{"prompt": "The capital of France is", "target_new": "Rome"},
             {"prompt": "The capital of  France is", "target_new": "Berlin"}]
    with pytest.warns(UserWarning, match="requests 0 and 1 give the same prompt .* two targets"):
        apply_smedit_to_model(model, tok, twice, hp)
    with pytest.warns(UserWarning, match="two targets"):
        apply_comeba_hk_to_model(copy.deepcopy(model), tok,
                                 [{**REQUESTS[0], "target_new": t} for t in ("Rome", "Berlin")], chp())


# -- archives --------------------------------------------------------------------------------

def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


ARCHIVE_DAMAGE = {
    "bit-flip in the weights": (lambda p: _flip_a_byte(archive_folder(p) / "hypernet.safetensors"),
                                "hypernet.safetensors fails its checksum"),
    "truncated weights": (lambda p: (archive_folder(p) / "hypernet.safetensors").write_bytes(b"\x08"),
                          "hypernet.safetensors fails its checksum"),
    "meta.json edited": (lambda p: (archive_folder(p) / "meta.json").write_text("{}"), "meta.json fails its checksum"),
    "manifest is garbage": (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is damaged"),
    "manifest of a state": (lambda p: (p / "manifest.json").write_text(
        (p / "manifest.json").read_text().replace("smedit-hypernet/2", "smedit-comeba-hk/2")), "holds a 'smedit-comeba-hk/2'"),
    "manifest names a path outside": (lambda p: (p / "manifest.json").write_text(json.dumps({
        **json.loads((p / "manifest.json").read_text()), "files": {"../../secret": {"sha256": "0", "bytes": 1}}})),
        "entry '../../secret' is malformed"),
    "version folder gone": (lambda p: [f.unlink() for f in archive_folder(p).iterdir()], "is missing"),
    "weights not safetensors": (lambda p: rewrite_published(p, "hypernet.safetensors",
                                                            lambda f: f.write_bytes(b"\x10\x00" * 8)),
                                "hypernet.safetensors is not a readable safetensors file"),
    "meta.json not JSON": (lambda p: rewrite_published(p, "meta.json", lambda f: f.write_text("{")),
                           "meta.json is not valid JSON"),
    "meta.json without structure": (lambda p: rewrite_published(p, "meta.json", edit_json("structure", _DROP)),
                                    "field 'structure' is missing"),
    "meta.json of another format": (lambda p: rewrite_published(p, "meta.json", edit_json("format", "x/9")),
                                    "unknown archive format 'x/9'"),
    "NaN in a tensor": (lambda p: rewrite_published(p, "hypernet.safetensors", edit_tensors(
        lambda t: t[sorted(t)[0]].fill_(math.nan))), "holds NaN/inf"),
    "a tensor missing": (lambda p: rewrite_published(p, "hypernet.safetensors", edit_tensors(
        lambda t: t.pop(sorted(t)[0]))), "tensors missing"),
    "a tensor of another shape": (lambda p: rewrite_published(p, "hypernet.safetensors", edit_tensors(
        lambda t: t.update({k: torch.zeros(1) for k in sorted(t)[:1]}))), "the editor expects"),
    "a tensor of another dtype": (lambda p: rewrite_published(p, "hypernet.safetensors", edit_tensors(
        lambda t: t.update({k: t[k].double() for k in sorted(t)[-1:]}))), "torch.float64"),
    "older flat layout": (lambda p: [(p / "manifest.json").unlink(),
                                     (p / "meta.json").write_text("{}")], "older smedit-plugin"),
}


@pytest.mark.parametrize("damage", list(ARCHIVE_DAMAGE))
def test_finding6_damaged_archives_raise_archive_errors_naming_the_file(model, tok, smedit_archive, damage) -> None:
    hp, _ = smedit_archive
    path = Path(hp.archive)
    change, needle = ARCHIVE_DAMAGE[damage]
    change(path)
    before = params_of(model)
    with pytest.raises(ArchiveError) as err:
        apply_smedit_to_model(model, tok, REQUESTS, hp)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert_untouched(model, before)


def test_finding6_archive_of_another_model_with_the_same_shapes_is_refused(tok, smedit_archive, tiny) -> None:
    hp, _ = smedit_archive
    other, _ = tiny("smollm2", n_layers=4, seed=7)
    before = params_of(other)
    with pytest.raises(ArchiveError, match="was trained on another model .'tiny-smollm2'.*differ .* by \\d+ %"):
        apply_smedit_to_model(other, tok, REQUESTS, hp)
    assert_untouched(other, before)


def test_archive_identity_survives_a_dtype_change(model, tok, smedit_archive) -> None:
    hp, _ = smedit_archive
    load_archive(hp.archive, model.to(torch.bfloat16), hp)  # < 1 % rounding is the same model


# -- states ----------------------------------------------------------------------------------

def _state_version(folder: Path) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["version"]


STATE_DAMAGE = {
    "bit-flip in the tensors": (lambda f: _flip_a_byte(_state_version(f) / "hook_state.safetensors"),
                                "hook_state.safetensors fails its checksum"),
    "JSON half written": (lambda f: (_state_version(f) / "hook_state.json").write_text('{"format": '),
                          "hook_state.json fails its checksum"),
    "manifest gone": (lambda f: (f / "manifest.json").unlink(), "(no manifest.json)"),
    "manifest garbage": (lambda f: (f / "manifest.json").write_text("]"), "manifest.json is damaged"),
    "tensors not safetensors": (lambda f: rewrite_published(f, "hook_state.safetensors", lambda x: x.write_text("no")),
                                "hook_state.safetensors is not a readable safetensors file"),
    "JSON not JSON": (lambda f: rewrite_published(f, "hook_state.json", lambda x: x.write_text("{")),
                      "hook_state.json is not valid JSON"),
    "JSON without layers": (lambda f: rewrite_published(f, "hook_state.json", edit_json("layers", _DROP)),
                            "field 'layers' is missing"),
    "JSON of another method": (lambda f: rewrite_published(f, "hook_state.json", edit_json("alg_name", "ROME")),
                               "unknown method 'ROME'"),
    "JSON with ddof 5": (lambda f: rewrite_published(f, "hook_state.json", edit_json("ddof", 5)), "'ddof'"),
    "JSON naming a missing module": (lambda f: rewrite_published(f, "hook_state.json", edit_json(
        "rewrite_modules", ["model.layers.1.mlp.down_proj", "model.layers.9.mlp.down_proj"])), "model.layers.9"),
    "a tensor missing": (lambda f: rewrite_published(f, "hook_state.safetensors", edit_tensors(
        lambda t: t.pop("model.layers.2.mlp.down_proj.comeba_hook.c_accu"))), "tensors missing"),
    "a tensor mis-shaped": (lambda f: rewrite_published(f, "hook_state.safetensors", edit_tensors(
        lambda t: t.update({"model.layers.2.mlp.down_proj.comeba_hook.c_accu": torch.zeros(3, 3)}))),
        "has shape (3, 3)"),
    "NaN in a tensor": (lambda f: rewrite_published(f, "hook_state.safetensors", edit_tensors(
        lambda t: t["model.layers.1.mlp.down_proj.comeba_hook.c_accu"].fill_(math.inf))), "holds NaN/inf"),
    "steps as a float": (lambda f: rewrite_published(f, "hook_state.safetensors", edit_tensors(
        lambda t: t.update({"comeba_hk_state.steps": torch.zeros(())}))), "expected an integer tensor"),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_finding4_damaged_states_attach_nothing(model, saved_state, damage) -> None:
    folder, _, _ = saved_state
    change, needle = STATE_DAMAGE[damage]
    change(folder)
    before = params_of(model)
    with pytest.raises(StateError) as err:
        load_hook_state(model, folder)
    assert needle in str(err.value)
    assert_untouched(model, before)


def test_finding4_failed_load_then_the_good_state_loads(model, tok, saved_state) -> None:
    folder, tensors, _ = saved_state
    good_version = _state_version(folder)
    backup = {p.name: p.read_bytes() for p in good_version.iterdir()}
    rewrite_published(folder, "hook_state.safetensors", edit_tensors(
        lambda t: t.update({"model.layers.2.mlp.down_proj.comeba_hook.c_accu": torch.zeros(2, 2)})))
    before = params_of(model)
    with torch.no_grad():
        logits_before = model(**tok("The capital of France is", return_tensors="pt")).logits
    with pytest.raises(StateError, match="comeba_hook.c_accu has shape"):
        load_hook_state(model, folder)
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(**tok("The capital of France is", return_tensors="pt")).logits, logits_before)
    for name, data in backup.items():
        (good_version / name).write_bytes(data)
    rewrite_published(folder, "hook_state.safetensors", lambda f: None)
    load_hook_state(model, folder)
    loaded = {n: p for n, p in model.named_parameters()}
    for name, value in tensors.items():
        assert torch.equal(loaded[name].detach().cpu(), value), name


def test_finding4_attach_failing_midway_is_rolled_back(model, saved_state, monkeypatch) -> None:
    folder, _, _ = saved_state
    real = state_module.attach_state

    def attach_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module, "attach_state", attach_then_fail)
    before = params_of(model)
    with pytest.raises(KeyboardInterrupt):
        load_hook_state(model, folder)
    assert_untouched(model, before)


def test_finding6_state_of_another_model_is_refused(saved_state, tiny) -> None:
    folder, _, _ = saved_state
    other, _ = tiny("smollm2", n_layers=4, seed=7)
    before = params_of(other)
    with pytest.raises(StateError, match="different base model"):
        load_hook_state(other, folder)
    assert_untouched(other, before)


def test_state_on_a_model_that_has_one_is_refused(model, tok, saved_state) -> None:
    folder, _, hp = saved_state
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], hp)
    before = params_of(model)
    with pytest.raises(StateError, match="already carries"):
        load_hook_state(model, folder)
    assert set(dict(model.named_parameters())) == set(before)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_save_state_refuses_a_foreign_folder_and_a_file(model, tok, tmp_path) -> None:
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], chp())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "file").write_text("precious")
    for target, needle in ((tmp_path / "mine", "holds entries smedit-plugin did not write: thesis.tex"),
                           (tmp_path / "file", "existing file")):
        with pytest.raises(FileExistsError, match=needle):
            save_hook_state(model, target)
    with pytest.raises(FileExistsError, match="existing file"):  # overwrite never deletes what is not ours
        save_hook_state(model, tmp_path / "file", overwrite=True)
    save_hook_state(model, tmp_path / "mine", overwrite=True)  # written beside the user's file
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious" and (tmp_path / "file").read_text() == "precious"
    assert entries(tmp_path / "mine") == ["manifest.json", "thesis.tex", "v-000001"]


# ============================================================================================
# injected faults
# ============================================================================================

def _nan_at(call: int, real: Callable) -> Callable:
    """``predict_param_shift`` / ``consecutive_update`` whose ``call``-th result (0-based) is NaN.

    As a real NaN would, the poisoned call stays poisoned when the same inputs come again (a BP step
    that fails its one check recomputes its shifts module by module to name the culprit).
    """
    count = {"n": 0}
    poisoned: list[tuple] = []

    def content(arg):  # cached rows are compared by their values, as tensors are
        if isinstance(arg, ModuleCache):
            return arg.keys.clone(), arg.value_grads.clone()
        return arg.detach().clone() if isinstance(arg, torch.Tensor) else arg

    def equal(x, y) -> bool:
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(equal(a, b) for a, b in zip(x, y))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.shape == y.shape and torch.equal(x, y)
        return x is y

    def wrapped(*args, **kwargs):
        seen = tuple(content(a) for a in args)  # before the call: an edit drops each module's rows after it
        out = real(*args, **kwargs)
        hit = count["n"] == call or any(equal(seen, earlier) for earlier in poisoned)
        if count["n"] == call:
            poisoned.append(seen)
        count["n"] += 1
        if not hit:
            return out
        if isinstance(out, tuple):
            return (out[0] * math.nan,) + tuple(out[1:])
        return out * math.nan

    return wrapped


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("module", [0, 2])
def test_finding3_nan_shift_in_each_bp_step_is_never_written(model, tok, smedit_archive, monkeypatch, step,
                                                             module) -> None:
    hp, archive_tensors = smedit_archive
    monkeypatch.setattr(editor_module, "predict_param_shift",
                        _nan_at(step * len(MODULES) + module, editor_module.predict_param_shift))
    before = params_of(model)
    with pytest.raises(NonFiniteUpdateError) as err:
        apply_smedit_to_model(model, tok, REQUESTS, hp)
    message = str(err.value)
    assert f"SMEdit: BP step {step + 1} of 2, module {MODULES[module]}" in message and "Likely cause" in message
    assert_untouched(model, before)
    assert same_tensors(tensors_of(archive_folder(hp.archive), archive_module.WEIGHTS), archive_tensors)


def test_finding3_nan_shift_of_malmen1_is_never_written(model, tok, tmp_path, monkeypatch) -> None:
    _, hp = make_archive(model, tok, MALMEN2HyperParams(**SMALL, alg_name="MALMEN1"), tmp_path / "m1")
    monkeypatch.setattr(editor_module, "predict_param_shift", _nan_at(1, editor_module.predict_param_shift))
    before = params_of(model)
    with pytest.raises(NonFiniteUpdateError, match=f"MALMEN1: BP step 1 of 1, module {MODULES[1]}"):
        apply_malmen2_to_model(model, tok, REQUESTS, hp)
    assert_untouched(model, before)


def test_a_weight_overflowing_its_dtype_is_rolled_back(model, tok, smedit_archive, monkeypatch) -> None:
    hp, _ = smedit_archive
    real = editor_module.predict_param_shift

    def huge(*args, **kwargs):
        shift, solver = real(*args, **kwargs)
        return torch.full_like(shift, 3e38), solver

    monkeypatch.setattr(editor_module, "predict_param_shift", huge)
    before = params_of(model)
    with pytest.raises(NonFiniteUpdateError, match="overflowed the model's dtype"):
        apply_smedit_to_model(model, tok, REQUESTS, hp.replace(bp_steps=2))
    assert_untouched(model, before)


@pytest.mark.parametrize("alg", ["MEMIT-C", "COMEBA-HK"])
@pytest.mark.parametrize("layer", [0, 1])
def test_finding3_nan_delta_in_each_layer_is_never_written(model, tok, monkeypatch, alg, layer) -> None:
    monkeypatch.setattr(comeba_main, "consecutive_update", _nan_at(layer, comeba_main.consecutive_update))
    before = params_of(model)
    with pytest.raises(NonFiniteUpdateError) as err:
        apply_comeba_hk_to_model(model, tok, REQUESTS, chp(alg_name=alg))
    assert f"{alg}: layer {[1, 2][layer]} ({layer + 1} of 2), module model.layers.{[1, 2][layer]}.mlp.down_proj" \
        in str(err.value)
    assert_untouched(model, before)


def test_nan_delta_on_top_of_earlier_edits_keeps_the_earlier_state(model, tok, monkeypatch, tmp_path) -> None:
    hp = chp(alg_name="MEMIT-C")
    apply_comeba_hk_to_model(model, tok, REQUESTS[:1], hp)
    before = params_of(model)
    monkeypatch.setattr(comeba_main, "consecutive_update", _nan_at(1, comeba_main.consecutive_update))
    with pytest.raises(NonFiniteUpdateError, match="MEMIT-C: layer 2"):
        apply_comeba_hk_to_model(model, tok, REQUESTS[1:], hp)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert find_state(model) is not None and int(find_state(model).steps) == 1
    remove_hook_layers(model)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_failure_after_the_first_of_several_modules_is_updated(model, tok, smedit_archive, monkeypatch,
                                                               interrupt) -> None:
    hp, _ = smedit_archive
    real = editor_module.add_param_shift_
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_module, "add_param_shift_", second_fails)
    before = params_of(model)
    with pytest.raises(type(interrupt)):
        apply_smedit_to_model(model, tok, REQUESTS, hp)
    assert len(calls) == 2
    assert_untouched(model, before)


# -- saves -----------------------------------------------------------------------------------

def _save_archive_v2(model, tok, path: Path):
    """A second, different archive version written over the first one."""
    return make_archive(model, tok, SMEditHyperParams(**SMALL), path, seed=2,
                        optimizer=torch.optim.Adam(HypernetEditor(model, SMEditHyperParams(**SMALL)).unique_parameters()))


SAVE_STEPS = ["write files", "checksum", "publish manifest", "verify", "remove old version"]


def _interrupt_step(monkeypatch, step: str) -> None:
    """Raise KeyboardInterrupt at one step of :func:`fileio.write_version`."""
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    if step == "write files":
        monkeypatch.setattr(archive_module, "save_file", boom)
    elif step == "checksum":
        monkeypatch.setattr(fileio, "sha256_of", boom)
    elif step == "publish manifest":
        monkeypatch.setattr(fileio.os, "replace", boom)
    elif step == "verify":  # after the new manifest is in place: the previous one is put back
        monkeypatch.setattr(fileio, "current_version", boom)
    else:
        monkeypatch.setattr(fileio, "_retire", boom)


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_finding2_ctrl_c_at_each_step_of_an_archive_save(model, tok, smedit_archive, monkeypatch, step) -> None:
    hp, old = smedit_archive
    path = Path(hp.archive)
    with monkeypatch.context() as patch:
        _interrupt_step(patch, step)
        with pytest.raises(KeyboardInterrupt):
            _save_archive_v2(model, tok, path)
    published = tensors_of(archive_folder(path), archive_module.WEIGHTS)  # checksums verified
    if step == "remove old version":  # the new version was published; the old one is what is left over
        assert not same_tensors(published, old) and len(fileio.leftovers(path)) == 1
    else:
        assert same_tensors(published, old)
    load_archive(path, model, hp)
    if step == "remove old version":
        with pytest.warns(UserWarning, match="interrupted save left behind: v-000001"):
            editor, _ = _save_archive_v2(model, tok, path)  # the next save removes what its journal recorded
    else:
        editor, _ = _save_archive_v2(model, tok, path)
    assert entries(path) == ["manifest.json", "v-000002" if step != "remove old version" else "v-000003"]
    assert same_tensors(tensors_of(archive_folder(path), archive_module.WEIGHTS),
                        {k: v.cpu() for k, v in editor.nets.state_dict().items()})


def _disk_full_on(monkeypatch, name: str) -> None:
    """The writer of file ``name`` (a safetensors save or a text write) raises ENOSPC."""
    for module in (archive_module, state_module):
        real_save = module.save_file

        def save(tensors, filename, *args, _real=real_save, **kwargs):
            if Path(filename).name == name:
                raise ENOSPC
            return _real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(module, "save_file", save)
    real_write = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name or (name == fileio.MANIFEST and self.name.startswith(".smedit-manifest-")):
            raise ENOSPC
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("name", ["hypernet.safetensors", "optimizer.safetensors", "meta.json", "manifest.json"])
def test_disk_full_on_each_file_of_an_archive_save(model, tok, smedit_archive, monkeypatch, name) -> None:
    hp, old = smedit_archive
    path = Path(hp.archive)
    with monkeypatch.context() as patch:
        _disk_full_on(patch, name)
        with pytest.raises(OSError, match="No space left"):
            _save_archive_v2(model, tok, path)
    assert same_tensors(tensors_of(archive_folder(path), archive_module.WEIGHTS), old)
    assert fileio.leftovers(path) == [] and entries(path) == ["manifest.json", "v-000001"]
    load_archive(path, model, hp)


@pytest.mark.parametrize("name", ["hook_state.safetensors", "hook_state.json", "manifest.json"])
def test_finding2_disk_full_on_each_file_of_a_state_save(tiny4, saved_state, monkeypatch, name) -> None:
    folder, old, hp = saved_state
    edited = copy.deepcopy(tiny4[0])
    load_hook_state(edited, folder)
    apply_comeba_hk_to_model(edited, tiny4[1], REQUESTS[::-1], hp)  # a newer state to save
    with monkeypatch.context() as patch:
        _disk_full_on(patch, name)
        with pytest.raises(OSError, match="No space left"):
            save_hook_state(edited, folder)
    fresh = copy.deepcopy(tiny4[0])
    load_hook_state(fresh, folder)  # the old tensors and the old JSON, together
    assert int(find_state(fresh).steps) == 1
    loaded = dict(fresh.named_parameters())
    assert all(torch.equal(loaded[k].detach(), v) for k, v in old.items())
    save_hook_state(edited, folder)
    newer = copy.deepcopy(tiny4[0])
    load_hook_state(newer, folder)
    assert int(find_state(newer).steps) == 2


def test_user_entries_named_like_a_saves_own_are_left_alone(tiny4, saved_state) -> None:
    """Issue 26: ``.partial-*`` and ``v-NNNNNN`` made by the user are not leftovers: nothing records them as ours."""
    folder, old, _ = saved_state
    (folder / ".partial-x1y2").mkdir()
    (folder / ".partial-x1y2" / "chapter1.tex").write_bytes(b"\x00" * 10)
    (folder / "v-000007").mkdir()
    (folder / "v-000007" / "results.csv").write_text("a,b\n")
    mine = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and ("partial" in str(p) or "v-000007" in str(p))}
    fresh = copy.deepcopy(tiny4[0])
    load_hook_state(fresh, folder)
    loaded = dict(fresh.named_parameters())
    assert all(torch.equal(loaded[k].detach(), v) for k, v in old.items())
    with pytest.raises(FileExistsError, match=r"\.partial-x1y2, v-000007.*only look like a save's own names"):
        save_hook_state(fresh, folder)
    save_hook_state(fresh, folder, overwrite=True)  # beside them
    assert entries(folder) == [".partial-x1y2", "manifest.json", "v-000007", "v-000008"]
    assert {p: p.read_bytes() for p in mine} == mine


# -- training: --out and resume ----------------------------------------------------------------

@pytest.fixture()
def records():
    return load_records(sample_path("zsre_sample"), "zsre", limit=8)


def _train_hp(**changes):
    return MALMEN2HyperParams(**{**SMALL, "alg_name": "MALMEN1", "loc_coef": 0.0, "max_steps": 2, "val_interval": 1,
                                 **changes})


@pytest.mark.parametrize("what", ["folder", "file", "another method's archive"])
def test_finding1_train_refuses_an_out_that_is_not_this_runs_archive(model, tok, tmp_path, records, what) -> None:
    out = tmp_path / "out"
    if what == "folder":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    elif what == "file":
        out.write_text("precious")
    else:
        make_archive(model, tok, SMEditHyperParams(**SMALL), out)
    snapshot = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = params_of(model)
    with pytest.raises(FileExistsError, match="--overwrite" if what != "file" else "existing file where a folder goes"):
        train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    assert_untouched(model, before)
    if what == "file":  # --overwrite never deletes what the plugin did not write
        with pytest.raises(FileExistsError, match="existing file"):
            train_hypernet(model, tok, _train_hp(max_steps=1), records, out, progress=False, overwrite=True)
        assert out.read_text() == "precious"
        return
    train_hypernet(model, tok, _train_hp(max_steps=1), records, out, progress=False, overwrite=True)
    assert read_meta(out)["alg_name"] == "MALMEN1"
    kept = ["thesis.tex"] if what == "folder" else []
    assert entries(out) == sorted(["manifest.json", _state_version(out).name, *kept])
    assert all((out / name).read_text() == "precious" for name in kept)


def test_finding2_interrupted_checkpoint_then_resume(model, tok, tmp_path, records, monkeypatch) -> None:
    out = tmp_path / "out"
    train_hypernet(model, tok, _train_hp(max_steps=1), records, out, progress=False)
    after_one = tensors_of(archive_folder(out), archive_module.WEIGHTS)
    assert read_meta(out)["train_state"]["units_done"] == 1
    with monkeypatch.context() as patch:
        _interrupt_step(patch, "publish manifest")
        with pytest.raises(KeyboardInterrupt):
            train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    assert same_tensors(tensors_of(archive_folder(out), archive_module.WEIGHTS), after_one)
    result = train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    assert result.state.units_done == 2 and result.edits_seen == 2  # resumed from unit 1, not from scratch
    assert entries(out) == ["manifest.json", _state_version(out).name]  # the unit-2 checkpoint was retired
    assert read_meta(out)["complete"] is True


def test_finding5_training_with_nan_lr_is_refused_before_it_starts(tmp_path) -> None:
    (tmp_path / "hp.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in _train_hp().to_dict().items()
                                                if k != "lr" and v is not None) + "\nlr: .nan\n")
    with pytest.raises(HyperParamsError, match="field 'lr' = nan must be a finite number"):
        load_hparams(tmp_path / "hp.yaml")
