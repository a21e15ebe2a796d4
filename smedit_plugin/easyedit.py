"""The boundary to EasyEdit: importing it and telling its era. A leaf: it imports nothing from the plugin, so the
one rollback (:mod:`smedit_plugin.editing`) can ask for the era without reaching model loading
(:mod:`smedit_plugin.easyedit_editor` builds editors).

Nothing here imports ``easyeditor`` at module import time: its import calls
``logging.basicConfig``, (at GitHub HEAD) reseeds every RNG, and on the PyPI wheel fails outright on
modern transformers. Every function imports it only when asked to.

Eras (contract §1): ``"A"`` is the 2023 PyPI wheel and early GitHub, where the apply function decides
whether an edit is undone (``keep_original_weight``); ``"C"`` is current GitHub, where the editor
restores unless ``sequential_edit=True``. The short transition era B has C's editor signature and is
reported as ``"C"``, which gives the right ``weights_copy`` semantics for its editor too.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import types
from typing import Any, Iterator, Optional


#: Names the PyPI wheel imports from ``transformers.modeling_utils`` that moved to ``transformers.pytorch_utils``.
MOVED_TRANSFORMERS_NAMES = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")

#: Packages EasyEdit imports at top level only for its multimodal (BLIP-2, MiniGPT-4) code.
VISION_PACKAGES = ("timm", "torchvision")

_ERA: dict[str, str] = {}


class EasyEditImportError(ImportError):
    """``easyeditor`` is missing or cannot be imported; the message says how to fix it."""


def install_transformers_shim() -> tuple[str, ...]:
    """Make the PyPI wheel (``easyeditor==0.0.1.dev0``) importable on transformers >= 4.4x. Opt-in.

    Copies :data:`MOVED_TRANSFORMERS_NAMES` from ``transformers.pytorch_utils`` onto
    ``transformers.modeling_utils``, where the wheel's BLIP-2 code still imports them from. Call it
    before EasyEdit is imported. Names already present are left alone; returns the names copied
    (empty when nothing was needed). ``import smedit_plugin`` never calls it.
    """
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    copied = []
    for name in MOVED_TRANSFORMERS_NAMES:
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
            copied.append(name)
    return tuple(copied)


class _MissingVisionAttribute:
    """Stands for a name a vision-dependent EasyEdit module could not define; using it raises ImportError."""

    def __init__(self, qualname: str, package: str) -> None:
        self._qualname = qualname
        self._package = package

    def _fail(self) -> ImportError:
        return ImportError(f"{self._qualname} is unavailable: {self._package} is not installed. Only EasyEdit's "
                           f"multimodal editors need it; install a {self._package} build that matches your torch")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._fail()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._fail()


class _VisionlessModule(types.ModuleType):
    """An EasyEdit module whose execution stopped at a vision import: names it did not reach are placeholders."""

    _missing_package = "a vision package"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingVisionAttribute(f"{self.__name__}.{name}", self._missing_package)


class _VisionTolerantLoader(importlib.abc.Loader):
    """Runs an EasyEdit module; if it stops only because a missing vision package is imported, keeps the module."""

    def __init__(self, loader: importlib.abc.Loader, missing: tuple[str, ...]) -> None:
        self._loader = loader
        self._missing = missing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        except ModuleNotFoundError as exc:
            package = (exc.name or "").split(".")[0]
            if package not in self._missing:
                raise
            module.__class__ = _VisionlessModule
            module._missing_package = package


class _VisionTolerantFinder(importlib.abc.MetaPathFinder):
    """Finds ``easyeditor.*`` modules as usual but loads them with :class:`_VisionTolerantLoader`.

    The vision packages themselves never appear in ``sys.modules``, so other libraries that probe
    for them (transformers, datasets) still see that they are absent.
    """

    def __init__(self, missing: tuple[str, ...]) -> None:
        self.missing = missing

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if not fullname.startswith("easyeditor."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _VisionTolerantLoader(spec.loader, self.missing)
        return spec


@contextlib.contextmanager
def _tolerate_missing_vision() -> Iterator[tuple[str, ...]]:
    """While the block runs, EasyEdit modules that import an uninstalled vision package load partially."""
    missing = tuple(p for p in VISION_PACKAGES if importlib.util.find_spec(p) is None)
    if not missing:
        yield missing
        return
    finder = _VisionTolerantFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)


def _shim_missing() -> bool:
    """True when the PyPI wheel would fail on this transformers and the shim is not installed yet."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    return any(not hasattr(modeling_utils, n) and hasattr(pytorch_utils, n) for n in MOVED_TRANSFORMERS_NAMES)


def _import_hint(exc: ImportError) -> str:
    """How to fix a failed ``import easyeditor``, from the name that could not be imported."""
    missing = (getattr(exc, "name", None) or "").split(".")[0]
    if missing == "easyeditor":
        return ("install EasyEdit: `pip install --no-deps easyeditor==0.0.1.dev0` plus what its import needs (see "
                "tests/easyedit_env.md), or put a GitHub checkout of EasyEdit on PYTHONPATH")
    shim = ("for the PyPI wheel call smedit_plugin.easyedit.install_transformers_shim() before EasyEdit is "
            "imported")
    if any(name in str(exc) for name in MOVED_TRANSFORMERS_NAMES):
        return shim
    hints = [shim] if _shim_missing() else []
    if missing in VISION_PACKAGES:
        hints.append(f"{missing} is only used by EasyEdit's multimodal code: install it, or import EasyEdit with "
                     "smedit_plugin.easyedit.import_easyeditor(tolerate_missing_vision=True)")
    elif missing:
        hints.append(f"EasyEdit imports {missing!r}: install the package that provides it")
    return "; ".join(hints) or "see the chained exception"


def import_easyeditor(*, tolerate_missing_vision: bool = False) -> types.ModuleType:
    """Import ``easyeditor`` (once per process) or raise :class:`EasyEditImportError` saying how to fix it.

    ``tolerate_missing_vision=True``: if ``timm``/``torchvision`` are not installed (CPU-only torch
    builds often have no matching torchvision), the EasyEdit modules that import them at top level
    (BLIP-2 and its processors, multimodal only) load as far as they get; the names they could not
    define raise ImportError when used. Text editing never uses them.
    """
    if "easyeditor" in sys.modules:
        return sys.modules["easyeditor"]
    tolerance = _tolerate_missing_vision() if tolerate_missing_vision else contextlib.nullcontext(())
    with tolerance:
        try:
            return importlib.import_module("easyeditor")
        except ImportError as exc:
            raise EasyEditImportError(f"cannot import easyeditor ({exc}); {_import_hint(exc)}") from exc


def easyedit_capabilities() -> dict[str, bool]:
    """What the loaded EasyEdit offers, found by looking, not by version strings (none are reliable).

    Keys: ``sequential_edit`` (``BaseEditor.edit`` takes it: era C), ``normalize_device`` (CPU-capable
    device handling), ``restore_after_edit`` (centralised restore), ``hparams_to_dict``.
    """
    import_easyeditor()
    editor_module = importlib.import_module("easyeditor.editors.editor")
    editors_utils = sys.modules.get("easyeditor.editors.utils")
    device_module = sys.modules.get("easyeditor.util.device")
    hparams_module = importlib.import_module("easyeditor.util.hparams")
    return {
        "sequential_edit": "sequential_edit" in inspect.signature(editor_module.BaseEditor.edit).parameters,
        "normalize_device": hasattr(device_module, "normalize_device"),
        "restore_after_edit": hasattr(editor_module, "restore_after_edit") or hasattr(editors_utils, "restore_after_edit"),
        "hparams_to_dict": hasattr(hparams_module.HyperParams, "to_dict"),
    }


def detect_era(*, allow_import: bool = True) -> Optional[str]:
    """``"A"`` or ``"C"`` for the EasyEdit of this process, None when it cannot be imported.

    ``allow_import=False`` only looks at an EasyEdit that is already loaded (and returns None
    otherwise), for callers that must not trigger EasyEdit's import side effects. A detected era is
    cached; None is not, so a later successful import is still seen.
    """
    if "era" in _ERA:
        return _ERA["era"]
    if not allow_import and "easyeditor.editors.editor" not in sys.modules:
        return None
    try:
        capabilities = easyedit_capabilities()
    except EasyEditImportError:
        return None
    _ERA["era"] = "C" if capabilities["sequential_edit"] else "A"
    return _ERA["era"]
