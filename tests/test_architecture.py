"""Structural rules of the package: no import cycles (through strings too), no import-order dependence, one table."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smedit_plugin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> plugin modules it imports anywhere in its body (module level and inside functions).

    ``from package import name`` is an edge to the submodule when ``name`` is one, else to the package.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def string_edges() -> dict[str, set[str]]:
    """The imports made from strings, drawn from the module that resolves them: the method table's
    ``"module:attribute"`` strings (families included) from :mod:`smedit_plugin.resolve`, the CLI table's
    from :mod:`smedit_plugin.cli`, the lazy package exports from the package itself."""
    import smedit_plugin
    from smedit_plugin import methods
    from smedit_plugin.cli import COMMANDS

    def module_of(ref: str) -> str:
        return ref.partition(":")[0]

    table = {module_of(ref) for spec in methods.METHODS.values()
             for ref in (spec.hparams_path, spec.apply_path, spec.family)}
    table |= {module_of(value) for key, value in vars(methods).items() if key.endswith("_FAMILY")}
    return {"smedit_plugin.resolve": table,
            "smedit_plugin.cli": {module_of(spec.setup) for spec in COMMANDS.values()},
            "smedit_plugin": set(smedit_plugin._EXPORTS.values())}


def full_graph() -> dict[str, set[str]]:
    """:func:`import_graph` with the :func:`string_edges` added."""
    graph = import_graph()
    for source, targets in string_edges().items():
        graph[source] |= {t for t in targets if t in graph and t != source}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when the graph is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_cycle_finder_sees_function_level_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "smedit_plugin.methods" in graph["smedit_plugin.hparams"]
    assert "smedit_plugin.easyedit" in graph["smedit_plugin.registry"]  # imported inside register()


def test_no_import_cycle_inside_the_package() -> None:
    cycle = find_cycle(full_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


#: The floors of docs/architecture.md: a module may import only from its own floor or below (prefixes match
#: packages; a method folder named in the table sits on the families' floor).
FLOORS = {
    0: ("methods", "errors", "_version", "easyedit", "table"),
    1: ("answers", "records", "requests", "text", "devices", "tfcompat", "fileio", "shipped", "memory"),
    2: ("evaluation", "general", "perplexity", "editing", "hparams_base", "models", "gguf_convert", "precision",
        "edit_modules", "request_checks", "distributed", "testing"),
    3: ("edit_loop", "families", "protocols"),
    4: ("hypernet", "comeba_hk", "easyedit_runs", "easyedit_editor"),
    5: ("hparams", "resolve"),
    6: ("compare", "registry", "auto"),
    7: ("commands",),
    8: ("cli", ""),
}


def floor_of(module: str) -> int:
    from smedit_plugin.methods import METHODS

    rest = module.removeprefix("smedit_plugin").removeprefix(".")
    table_folders = {spec.hparams_path.split(":")[0].split(".")[1] for spec in METHODS.values()}
    for floor, names in FLOORS.items():
        if rest in names or any(name and rest.startswith(name + ".") for name in names):
            return floor
    if rest.split(".")[0] in table_folders:
        return 4
    raise AssertionError(f"{module} has no floor: add it to FLOORS here and to docs/architecture.md")


def test_every_import_points_down_the_floors() -> None:
    up = sorted(f"{m} ({floor_of(m)}) -> {t} ({floor_of(t)})" for m, targets in full_graph().items()
                for t in targets if floor_of(t) > floor_of(m))
    assert not up, "imports that point up a floor:\n" + "\n".join(up)


def test_compare_imports_no_family() -> None:
    """``smedit compare`` drives every family through the runner interface; it names none of them."""
    families = ("smedit_plugin.hypernet", "smedit_plugin.comeba_hk", "smedit_plugin.easyedit_runs")
    graph = import_graph()
    found = {(m, t) for m, targets in graph.items() if m.startswith("smedit_plugin.compare")
             for t in targets if t.startswith(families)}
    assert not found, found


def test_no_module_imports_a_private_name() -> None:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
    assert not found, found


def test_string_edges_reach_every_table_target() -> None:
    edges = string_edges()
    assert "smedit_plugin.hypernet.runner" in edges["smedit_plugin.resolve"]
    assert "smedit_plugin.smedit.hparams" in edges["smedit_plugin.resolve"]
    assert "smedit_plugin.commands.train" in edges["smedit_plugin.cli"]
    assert "smedit_plugin.easyedit_editor" in edges["smedit_plugin"]


def test_a_cycle_through_a_method_table_string_is_caught(monkeypatch) -> None:
    """A family string naming a module that resolves the table itself (``hparams`` imports ``resolve``) closes a
    loop no import statement shows; the string edges make it visible."""
    import dataclasses

    from smedit_plugin.methods import METHODS

    assert not find_cycle(full_graph())
    looping = dataclasses.replace(METHODS["SMEdit"], name="Looping", family="smedit_plugin.hparams:load_hparams")
    monkeypatch.setitem(METHODS, "Looping", looping)
    cycle = find_cycle(full_graph())
    assert cycle and "smedit_plugin.resolve" in cycle and "smedit_plugin.hparams" in cycle, cycle


_PROBE = r"""
import dataclasses, json, sys


def import_easyeditor():
    from smedit_plugin import easyedit  # the wheel needs the shim; neither touches the hparams modules
    easyedit.install_transformers_shim()
    easyedit.import_easyeditor(tolerate_missing_vision=True)


order = sys.argv[1]
if order == "before":
    import_easyeditor()
from smedit_plugin.hparams import HyperParamsError, read_config
from smedit_plugin.methods import METHODS
from smedit_plugin.resolve import hparams_class
classes = {name: hparams_class(name) for name in METHODS}
if order == "after":
    import_easyeditor()
assert ("easyeditor" in sys.modules) == (order != "never")
out = {}
for name, cls in classes.items():
    fields = {f.name: "<required>" if f.default is dataclasses.MISSING else repr(f.default)
              for f in dataclasses.fields(cls)}
    config, _ = read_config(f"{name}/smollm2-135m")
    loaded = cls.from_dict(config).to_dict()
    errors = []
    for bad in ({"batch_size": 0}, {"max_length": "long"}, {"alg_name": "nope"}, {"batch_sise": 1}):
        try:
            cls.from_dict({**config, **bad})
        except HyperParamsError as exc:
            errors.append(str(exc))
    out[name] = {"mro": [c.__module__ + "." + c.__qualname__ for c in cls.__mro__], "fields": fields,
                 "loaded": repr(loaded), "errors": errors}
print(json.dumps(out, sort_keys=True))
"""


def _probe(order: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, order], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_easyeditor() -> bool:
    import importlib.util

    return importlib.util.find_spec("easyeditor") is not None


@pytest.mark.parametrize("order", [
    pytest.param("before", marks=pytest.mark.skipif(not _has_easyeditor(), reason="easyeditor is not installed")),
    pytest.param("after", marks=pytest.mark.skipif(not _has_easyeditor(), reason="easyeditor is not installed")),
])
def test_hparams_classes_do_not_depend_on_import_order(order: str) -> None:
    assert _probe(order) == _probe("never")


def test_hparams_classes_in_a_fresh_process_without_easyeditor() -> None:
    result = _probe("never")
    from smedit_plugin.methods import METHODS

    assert set(result) == set(METHODS)
    assert all(not any("easyeditor" in c for c in entry["mro"]) for entry in result.values())
    assert all(len(entry["errors"]) == 4 for entry in result.values())


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals that are not docstrings (docstrings may name methods)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_method_names_live_only_in_the_table_and_their_folders() -> None:
    from smedit_plugin.methods import METHODS

    folders = {spec.name: spec.hparams_path.split(":")[0].split(".")[1] for spec in METHODS.values()}
    names = set(METHODS)
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel == Path("methods.py"):
            continue
        for line, value in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            for name in names:
                if name in value and rel.parts[0] != folders[name]:
                    found.add(f"{rel}:{line}: {value!r}")
    assert not found, "method names outside the table and their folders:\n" + "\n".join(sorted(found))


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_imports_and_shows_its_help(script: str) -> None:
    """A benchmark that imports a moved module fails here, not weeks later in a long measurement."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
