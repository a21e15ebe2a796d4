"""Typed, validated hyperparameters shared by every method of the plugin.

Each method declares a dataclass that subclasses :class:`MethodHyperParams`. Loading is strict
(unknown keys, missing keys, wrong types and out-of-range values all raise
:class:`HyperParamsError` naming the field and the file) because EasyEdit's own loaders fail late
and silently on exactly those mistakes. The classes are plain dataclasses, the same
whether or not ``easyeditor`` was imported first: EasyEdit never type-checks hparams, so
``BaseEditor`` accepts them, and they offer the ``to_dict``/``from_json`` its ``HyperParams`` has.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import yaml

from .errors import HyperParamsError
from .methods import canonical_alg_name

def resolve_hparams_path(path: Union[str, os.PathLike]) -> Path:
    """A file path (``.yaml``/``.yml``/``.json`` or a bare stem tried with each suffix), else a shipped name.

    A shipped name is ``METHOD/model`` or ``TRAINING/METHOD/model`` (``SMEdit/llama3-8b``); it is
    looked up in the package's YAMLs only when no such file exists relative to the working directory.
    """
    from .shipped import is_shipped_name, shipped_hparams_path

    p = Path(path)
    candidates = [p] if p.suffix in (".yaml", ".yml", ".json") else [p.with_name(p.name + s) for s in
                                                                     (".yaml", ".yml", ".json")] + [p]
    for cand in candidates:
        if cand.is_file():
            return cand
    if is_shipped_name(str(path).replace(os.sep, "/")):
        try:
            return shipped_hparams_path(str(path).replace(os.sep, "/"))
        except FileNotFoundError as exc:
            raise HyperParamsError(f"hparams file {p} does not exist, and {exc}") from None
    shown = p if p.suffix in (".yaml", ".yml", ".json") else f"{p}(.yaml|.yml|.json)"
    raise HyperParamsError(f"hparams file {shown} does not exist")


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first on line {seen[key]})")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise _DuplicateKey(f"key(s) {', '.join(map(repr, twice))} given twice in one object")
    return dict(pairs)


def read_config(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], Path]:
    """Read a YAML or JSON mapping without any conversion."""
    p = resolve_hparams_path(path)
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text, object_pairs_hook=_unique_json_pairs) if p.suffix == ".json" else \
            yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise HyperParamsError(f"{p}: {exc}; keep one (with two, which one wins is easy to get wrong)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise HyperParamsError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise HyperParamsError(f"{p}: top level must be a mapping of field: value, got {type(data).__name__}")
    return data, p


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is tuple:
        return "tuple"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _to_float(value: Any) -> Any:
    """Parse scientific notation strings that PyYAML leaves as str (``1e-5``)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, converted) for ``value`` against annotation ``tp``; floats only for float fields."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _coerce(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, conv = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is tuple:
        return isinstance(value, (list, tuple)), tuple(value) if isinstance(value, (list, tuple)) else value
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                return False, value
            return (f.is_integer(), int(f)) if f.is_integer() else (False, value)
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is float:
        conv = _to_float(value)
        return isinstance(conv, float) and not isinstance(value, bool), conv
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


@dataclasses.dataclass(kw_only=True)
class MethodHyperParams:
    """Fields EasyEdit's ``BaseEditor`` and evaluation read, plus the loader.

    ``batch_size`` keeps EasyEdit's meaning (edits per apply call); every method's own
    micro-batch sizes use other names.
    """

    alg_name: str
    model_name: Any = dataclasses.field(metadata={"help": "model path, hub id, 'smollm2-135m', 'gemma-3-270m', or a (model, tokenizer) tuple set in code"})
    device: Optional[Union[int, str]] = dataclasses.field(default=None, metadata={"help": "None = CUDA if present else CPU; int or 'cuda:N' = that GPU (CPU when no CUDA); 'cpu'"})
    model_parallel: bool = False
    batch_size: int = dataclasses.field(default=1, metadata={"range": (1, None)})
    max_length: int = dataclasses.field(default=64, metadata={"range": (8, None)})
    fp16: bool = False

    #: Canonical names this class accepts in ``alg_name`` (first is the default).
    ALG_NAMES: ClassVar[tuple[str, ...]] = ()
    #: Cross-field constraints: callables returning an error message or None.
    _checks: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------
    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def validate(self, source: str = "<hparams>") -> None:
        """Check every field's type and range, then the class's cross-field rules."""
        hints = self._hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model_name" and not isinstance(value, str):
                if not (isinstance(value, tuple) and len(value) == 2):
                    raise HyperParamsError(f"{source}: field 'model_name' must be a string or a (model, tokenizer) tuple")
                continue
            ok, conv = _coerce(value, hints[f.name])
            if not ok:
                raise HyperParamsError(
                    f"{source}: field {f.name!r} must be {_type_name(hints[f.name])}, got {value!r}"
                )
            object.__setattr__(self, f.name, conv)
            items = conv if isinstance(conv, list) else [conv]
            if f.metadata.get("finite", True) and any(isinstance(x, float) and not math.isfinite(x) for x in items):
                raise HyperParamsError(f"{source}: field {f.name!r} = {value!r} must be a finite number (not NaN or inf)")
            rng = f.metadata.get("range")
            if rng is not None and conv is not None:
                lo, hi = rng
                for item in items:
                    if (lo is not None and item < lo) or (hi is not None and item > hi):
                        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                        raise HyperParamsError(f"{source}: field {f.name!r} = {item!r} is out of range {bounds}")
            choices = f.metadata.get("choices")
            if choices is not None and conv is not None and conv not in choices:
                raise HyperParamsError(f"{source}: field {f.name!r} = {conv!r}; choose one of {list(choices)}")
        if self.ALG_NAMES:
            try:
                name = canonical_alg_name(self.alg_name)
            except HyperParamsError as exc:
                raise HyperParamsError(f"{source}: field 'alg_name': {exc}") from None
            if name not in self.ALG_NAMES:
                raise HyperParamsError(
                    f"{source}: alg_name {self.alg_name!r} does not belong to {type(self).__name__}; "
                    f"it accepts {list(self.ALG_NAMES)}"
                )
            self.alg_name = name
        for check in self._checks:
            msg = check(self)
            if msg:
                raise HyperParamsError(f"{source}: {msg}")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "<dict>"):
        """Build from a mapping with the same strictness as :meth:`from_hparams`."""
        config = dict(config)
        if "alg" in config:
            legacy = config.pop("alg")
            if "alg_name" in config and canonical_alg_name(legacy) != canonical_alg_name(config["alg_name"]):
                raise HyperParamsError(f"{source}: 'alg' ({legacy!r}) and 'alg_name' ({config['alg_name']!r}) disagree")
            config.setdefault("alg_name", legacy)
        if "alg_name" not in config and cls.ALG_NAMES:
            raise HyperParamsError(f"{source}: missing required field 'alg_name' (one of {list(cls.ALG_NAMES)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise HyperParamsError(
                f"{source}: unknown field(s) {', '.join(hints)} for {cls.__name__}; remove them or fix the spelling"
            )
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in config and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise HyperParamsError(f"{source}: missing required field(s) {', '.join(map(repr, missing))}")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name == "model_name" and isinstance(config.get(f.name), tuple):
                val = config[f.name]  # a (model, tokenizer) pair is shared, never copied
            elif f.name in config:
                val = copy.deepcopy(config[f.name])
            elif f.default is not dataclasses.MISSING:
                val = copy.deepcopy(f.default)
            else:
                val = f.default_factory()
            object.__setattr__(obj, f.name, val)
        obj.validate(source)
        return obj

    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, os.PathLike]):
        """Load ``.yaml``/``.yml``/``.json`` (or a bare stem) into this class, strictly."""
        config, path = read_config(hparams_name_or_path)
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_json(cls, fpath: Union[str, os.PathLike]):
        """EasyEdit's name for loading a JSON file, with this package's strict checks."""
        return cls.from_hparams(fpath)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model_name" and not isinstance(value, str):
                value = getattr(value[0], "name_or_path", "<in-memory model>")
            out[f.name] = copy.deepcopy(value)
        return out

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied; the original is never mutated."""
        data = self.to_dict()
        if not isinstance(self.model_name, str):
            data["model_name"] = self.model_name
        data.update(changes)
        return type(self).from_dict(data, source=f"{type(self).__name__}.replace")
