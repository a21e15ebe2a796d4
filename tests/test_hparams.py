"""Hyperparameter loading: strictness, aliases, formats, and every shipped YAML against a real architecture."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from smedit_plugin.hparams import HyperParamsError, canonical_alg_name, load_hparams
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.edit_modules import resolve_edit_modules
from smedit_plugin.models import ARCHITECTURES
from smedit_plugin.testing import tiny_model
from smedit_plugin.methods import METHODS
from smedit_plugin.resolve import family_runner, hparams_class
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.smedit.hparams import SMEditHyperParams

ROOT = Path(__file__).resolve().parents[1]
# hparams/EASYEDIT holds YAMLs in EasyEdit's own format for its built-in methods (tests/test_easyedit_runs.py)
YAMLS = sorted(p for p in (ROOT / "hparams").rglob("*.yaml") if "EASYEDIT" not in p.parts)

BASE = {"alg_name": "MALMEN2", "model_name": "smollm2-135m", "edit_modules": ["model.layers.3.mlp.up_proj"]}


def _write(tmp_path: Path, name: str, data: dict, fmt: str = "yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    return path


def test_every_method_has_a_yaml_per_model() -> None:
    for method in METHODS:
        for model in ARCHITECTURES:
            assert (ROOT / "hparams" / method / f"{model}.yaml").is_file(), (method, model)
            if family_runner(method).trains:
                assert (ROOT / "hparams" / "TRAINING" / method / f"{model}.yaml").is_file(), (method, model)


@lru_cache(maxsize=None)
def _tiny(arch: str):
    model, _ = tiny_model(arch)
    return model


def _edit_module_names(hp) -> list[str]:
    if hasattr(hp, "edit_modules"):
        return list(hp.edit_modules)
    return [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT / "hparams")) for p in YAMLS])
def test_shipped_yaml_loads_and_names_real_linear_modules(path: Path) -> None:
    hp = load_hparams(path)
    assert hp.alg_name == path.parent.name
    assert type(hp) is hparams_class(hp.alg_name)
    model_key = path.stem.removesuffix("-seq").removesuffix("-demo")  # sequential and demo variants
    arch = ARCHITECTURES[model_key]
    names = _edit_module_names(hp)
    assert names
    resolved = resolve_edit_modules(_tiny(arch.tiny_arch), names)
    assert [n for n, _ in resolved] == names


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT / "hparams")) for p in YAMLS])
def test_shipped_yaml_model_name_loads_by_name(path: Path) -> None:
    """EasyEdit's BaseEditor passes model_name to from_pretrained: a hub id, or one of our packaged CPU keys."""
    from smedit_plugin.gguf_convert import PRETRAINED

    model_key = path.stem.removesuffix("-seq").removesuffix("-demo")
    name = load_hparams(path).model_name
    expected = model_key if model_key in PRETRAINED else ARCHITECTURES[model_key].hub_id
    assert name == expected, f"{path.relative_to(ROOT)}: model_name {name!r}, want {expected!r}"


def test_yaml_scientific_notation_becomes_float_only_for_float_fields(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text("alg_name: MALMEN2\nmodel_name: m\nedit_modules: [a.b]\nlr: 1e-6\nmeta_lr: 2e-5\nrank: 1e3\n")
    hp = MALMEN2HyperParams.from_hparams(path)
    assert hp.lr == pytest.approx(1e-6) and isinstance(hp.lr, float)
    assert hp.meta_lr == pytest.approx(2e-5)
    assert hp.rank == 1000 and isinstance(hp.rank, int)
    path.write_text("alg_name: MALMEN2\nmodel_name: '1e3'\nedit_modules: [a.b]\n")
    assert MALMEN2HyperParams.from_hparams(path).model_name == "1e3"


@pytest.mark.parametrize("suffix", ["yaml", "yml", "json"])
def test_formats_and_bare_stem(tmp_path: Path, suffix: str) -> None:
    _write(tmp_path, f"cfg.{suffix}", BASE, "json" if suffix == "json" else "yaml")
    assert MALMEN2HyperParams.from_hparams(tmp_path / f"cfg.{suffix}").bp_steps == 2
    assert MALMEN2HyperParams.from_hparams(tmp_path / "cfg").alg_name == "MALMEN2"


@pytest.mark.parametrize("alias,canonical", [("MALMEN^2", "MALMEN2"), ("malmen2", "MALMEN2"), ("emsedit", "SMEdit"),
                                             ("RLEdit^2", "RLEdit2"), ("coachhook", "COMEBA-HK"), ("memit_c", "MEMIT-C")])
def test_aliases_normalise(alias: str, canonical: str) -> None:
    assert canonical_alg_name(alias) == canonical


def test_alias_in_file_and_legacy_alg_key(tmp_path: Path) -> None:
    hp = load_hparams(_write(tmp_path, "a.yaml", {**BASE, "alg_name": "MALMEN^2"}))
    assert hp.alg_name == "MALMEN2" and isinstance(hp, MALMEN2HyperParams)
    legacy = {k: v for k, v in BASE.items() if k != "alg_name"} | {"alg": "malmen1"}
    hp = load_hparams(_write(tmp_path, "b.yaml", legacy))
    assert hp.alg_name == "MALMEN1" and hp.bp_steps == 1


@pytest.mark.parametrize("change,needle", [
    ({"rnak": 4}, "'rnak' (did you mean 'rank'?)"),
    ({"rank": "big"}, "field 'rank' must be int"),
    ({"rank": 0}, "field 'rank' = 0 is out of range"),
    ({"lr": True}, "field 'lr' must be float"),
    ({"edit_modules": []}, "'edit_modules' is empty"),
    ({"alg_name": "SMEdit"}, "does not belong to MALMEN2HyperParams"),
    ({"alg_name": "NOPE"}, "unknown method 'NOPE'"),
    ({"model_dtype": "int8"}, "choose one of"),
])
def test_bad_values_name_field_and_file(tmp_path: Path, change: dict, needle: str) -> None:
    path = _write(tmp_path, "bad.yaml", {**BASE, **change})
    with pytest.raises(HyperParamsError) as err:
        MALMEN2HyperParams.from_hparams(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_required_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "m.yaml", {"alg_name": "MALMEN2", "model_name": "m"})
    with pytest.raises(HyperParamsError, match="missing required field.*'edit_modules'"):
        MALMEN2HyperParams.from_hparams(path)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(HyperParamsError, match="does not exist"):
        load_hparams(tmp_path / "nothing")


def test_weight_suffix_stripped_and_replace_does_not_mutate() -> None:
    hp = SMEditHyperParams(model_name="m", edit_modules=["x.mlp.up_proj.weight"])
    assert hp.edit_modules == ["x.mlp.up_proj"]
    other = hp.replace(bp_steps=3, num_seq=5)
    assert (hp.bp_steps, hp.num_seq) == (2, 1)
    assert other.step_ranks() == [1024, 512, 341]
    assert hp.step_ranks() == [1024, 1024]


def test_method_defaults_follow_the_paper() -> None:
    sm = SMEditHyperParams(model_name="m", edit_modules=["a"])
    assert (sm.rank, sm.n_blocks, sm.lr, sm.meta_lr, sm.max_grad_norm, sm.reg_coef, sm.bp_steps) == \
        (1024, 4, 1e-6, 1e-5, 1.0, 0.5, 2)
    assert sm.shared_hypernet_for(1) and not sm.shared_hypernet_for(10)
    rl = RLEdit2HyperParams(model_name="m", edit_modules=["a"])
    assert (rl.loc_coef, rl.reg_coef, rl.discount, rl.back_depth, rl.time_decay, rl.bp_steps) == \
        (0.6, 1e-4, 1.0, 10, 0.95, 2)
    assert not rl.shared_hypernet_for(1)
    assert RLEdit2HyperParams(alg_name="RLEdit1", model_name="m", edit_modules=["a"]).bp_steps == 1
    ml = MALMEN2HyperParams(model_name="m", edit_modules=["a"])
    assert (ml.loc_coef, ml.bp_steps) == (0.6, 2) and ml.shared_hypernet_for(10)


def test_tuple_model_name_is_accepted_but_not_other_objects() -> None:
    hp = SMEditHyperParams(model_name=(object(), object()), edit_modules=["a"])
    assert isinstance(hp.model_name, tuple)
    with pytest.raises(HyperParamsError, match="model_name"):
        SMEditHyperParams(model_name=3, edit_modules=["a"])
