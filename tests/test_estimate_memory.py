"""benchmarks/estimate_memory.py sizes each edit module by its own role (it used to size every one as a
down-projection: the layer template ``model.layers.{i}`` has an empty suffix that every name ends with)."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from smedit_plugin.hparams import load_hparams
from smedit_plugin.hypernet.shifts import module_shape as real_shape
from smedit_plugin.methods import HYPERNET_FAMILY, LOCATE_FAMILY, methods_of_family
from smedit_plugin.models import ARCHITECTURES
from smedit_plugin.testing import TINY_HIDDEN, TINY_INTERMEDIATE, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def estimator():
    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "benchmarks" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key,name,shape", [
    ("llama3-8b", "model.layers.11.mlp.gate_proj", (4096, 14336)),
    ("llama3-8b", "model.layers.24.mlp.up_proj", (4096, 14336)),
    ("llama3-8b", "model.layers.4.mlp.down_proj", (14336, 4096)),
    ("gpt-j-6b", "transformer.h.10.mlp.fc_in", (4096, 16384)),
    ("gpt-j-6b", "transformer.h.27.mlp.fc_out", (16384, 4096)),
    ("gemma-2", "model.layers.32.mlp.gate_proj", (3584, 14336)),
    ("gemma-2", "model.layers.40.mlp.down_proj", (14336, 3584)),
])
def test_module_shapes_of_the_large_checkpoints(estimator, key: str, name: str, shape: tuple[int, int]) -> None:
    assert estimator.module_shape(ARCHITECTURES[key], name) == shape


@pytest.mark.parametrize("key,tiny", [("llama3-8b", "llama3"), ("gpt-j-6b", "gpt-j"), ("gemma-2", "gemma-2")])
def test_module_shapes_match_the_real_modules_of_each_architecture(estimator, key: str, tiny: str) -> None:
    """Every MLP projection of a (tiny-width) model of the family: the estimate's (d_in, d_out) is the module's."""
    model, _ = tiny_model(tiny, n_layers=2)
    arch = dataclasses.replace(ARCHITECTURES[key], hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE)
    names = [arch.module_name(role, layer) for role in ("gate", "up", "down", "fc_in", "fc_out") if role in arch.modules
             for layer in range(2)]
    assert len(names) in (4, 6)
    for name in names:
        assert estimator.module_shape(arch, name) == real_shape(model.get_submodule(name)), name


def test_a_name_that_is_no_mlp_projection_is_refused(estimator) -> None:
    with pytest.raises(ValueError, match="not an MLP projection"):
        estimator.module_shape(ARCHITECTURES["llama3-8b"], "model.layers.3")
    with pytest.raises(ValueError, match="not an MLP projection"):
        estimator.module_shape(ARCHITECTURES["llama3-8b"], "model.layers.3.self_attn.q_proj")


def test_cached_rows_of_llama_gate_and_up_modules_use_their_widths(estimator) -> None:
    """SMEdit on Llama-3-8B edits 12 gate/up projections (4096 -> 14336): the BP step of an edit holds every
    module's keys and value gradients, then the first module's shift, factor, value diffs and shift check."""
    hp = load_hparams(str(ROOT / "hparams" / "SMEdit" / "llama3-8b.yaml"))
    rows = hp.batch_size * estimator.ANSWER_TOKENS
    d_in, d_out = 4096, 14336
    factor = min(rows, d_in) ** 2 * 4
    expected = 12 * rows * (d_in + d_out) * 4 + d_in * d_out * 4 + 2 * factor + rows * d_out * 4 + d_in * d_out * 4
    assert estimator.hypernet("llama3-8b", hp, training=False)["BP step"] == expected


def test_every_method_of_the_table_is_estimated_on_every_large_model(estimator) -> None:
    """The plugin's hypernetwork and locate-then-edit methods, as the method table lists them."""
    methods = methods_of_family(HYPERNET_FAMILY) + methods_of_family(LOCATE_FAMILY)
    rows = estimator.estimate()
    assert {r["method"] for r in rows} == set(methods) and len(methods) >= 7
    for method in methods:
        assert {r["model"] for r in rows if r["method"] == method} == set(estimator.CHECKPOINTS), method
    assert all(value >= 0 for r in rows for value in r["items"].values())
