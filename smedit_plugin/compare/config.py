"""``smedit compare`` settings: the config, the ``--methods`` mini-language, and which YAML each method uses.

Every bad setting is reported here, before a model is loaded or a weight touched.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

from ..easyedit_runs import split_method
from ..hparams import HyperParamsError, MethodHyperParams, load_hparams
from ..methods import COMPARE_DEFAULT, METHODS

PROTOCOLS = ("batch", "sequential", "consecutive", "single-round")
ROW_FIELDS = ("method", "model", "dataset", "protocol", "n_edits", "num_seq", "efficacy", "generalization",
              "specificity", "portability", "train_s_per_edit", "edit_s_per_edit", "peak_rss_mb")
#: ES, GS, LS and PS; ``portability`` is None in every row when the records have no portability questions.
METRIC_NAMES = ("efficacy", "generalization", "specificity", "portability")
#: What the COMEBA-HK paper's ``average`` averages: reliability, generality, locality.
AVERAGED_METRICS = ("efficacy", "generalization", "specificity")
LOCATE_PROTOCOLS = ("consecutive", "single-round")


def hparams_dir() -> Path:
    """The hparams tree: ``$SMEDIT_HPARAMS_DIR`` or the YAMLs shipped in the package."""
    from ..shipped import hparams_root

    return hparams_root()


def method_hparams(method: str, model_key: str, *, training: bool, root: Optional[Path] = None) -> MethodHyperParams:
    """The shipped YAML of ``method`` for ``model_key`` (``-seq`` variants are picked by the caller)."""
    base = (root or hparams_dir()) / ("TRAINING" if training else "") / method / f"{model_key}.yaml"
    if not base.is_file():
        raise HyperParamsError(f"no hparams file {base} for method {method!r} and model {model_key!r}")
    return load_hparams(base)


def builtin_hparams_dir() -> Path:
    """EasyEdit-format YAMLs of EasyEdit's own methods for the plugin's CPU models (``hparams/EASYEDIT``)."""
    return hparams_dir() / "EASYEDIT"


def method_hparams_for(method: str, model_key: str, *, training: bool, sequential: bool) -> MethodHyperParams:
    """:func:`method_hparams`, or the ``<model>-seq.yaml`` variant under the sequential protocol when one ships."""
    seq_file = hparams_dir() / ("TRAINING" if training else "") / method / f"{model_key}-seq.yaml"
    if sequential and seq_file.is_file():
        return load_hparams(seq_file)
    return method_hparams(method, model_key, training=training)


@dataclasses.dataclass
class CompareConfig:
    model: str
    dataset: str
    train_data: Optional[Path]
    eval_data: Path
    methods: list[str]
    protocol: str = "batch"
    n_edits: int = 64
    num_seq: int = 1
    batch_size: int = 10
    archive_root: Optional[Path] = None
    retrain: bool = False
    curve_every: int = 0
    progress: bool = True
    easyedit_hparams: Optional[Path] = None
    via_easyedit: bool = False
    general_every: int = 0
    general_items: int = 100
    general_tokens: int = 4096

    @property
    def locate(self) -> bool:
        return self.protocol in LOCATE_PROTOCOLS

    @property
    def chunk_size(self) -> int:
        """Facts per edit call: one batch (batch, sequential) or one step (consecutive, single-round)."""
        return self.batch_size if self.locate else self.n_edits


def parse_methods(text: str) -> list[str]:
    """``--methods`` split on the commas that are not inside an entry's ``[...]`` overrides."""
    entries, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current.strip())
            current = ""
        else:
            current += char
    entries.append(current.strip())
    return [e for e in entries if e]


def method_overrides(entry: str) -> tuple[str, dict[str, Any]]:
    """``"SMEdit[reg_coef=0,bp_steps=3]"`` -> ``("SMEdit", {"reg_coef": 0, "bp_steps": 3})`` (values parsed as JSON).

    Lets one run hold a method beside a variant of itself (e.g. the paper's l2 coefficient and none).
    """
    match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*", entry)
    if match is None:
        raise ValueError(f"--methods entry {entry!r} is not METHOD or METHOD[field=value,...]")
    name, inner = match.group(1), match.group(2)
    overrides: dict[str, Any] = {}
    for item in [] if inner is None else [i for i in inner.split(",") if i.strip()]:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"--methods entry {entry!r}: override {item!r} is not field=value")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return name, overrides


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One ``--methods`` entry, parsed: the text as given, the method, whether it is EasyEdit's own, its overrides."""

    text: str
    method: str
    builtin: bool
    overrides: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> "MethodEntry":
        name, overrides = method_overrides(text)
        builtin, method = split_method(name)
        return cls(text, method, builtin, overrides)


def check_config(cfg: CompareConfig) -> None:
    """Every bad setting is reported before a model is loaded or a weight touched."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if not cfg.methods:
        raise ValueError(f"--methods is empty; name at least one method (e.g. --methods {','.join(COMPARE_DEFAULT)})")
    for field, least in (("n_edits", 1), ("num_seq", 1), ("batch_size", 1), ("curve_every", 0)):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"--{field.replace('_', '-')} must be an integer >= {least}, got {value!r}")
    if cfg.protocol == "batch" and cfg.num_seq != 1:
        raise ValueError("--protocol batch edits one batch: use --num-seq 1 (or --protocol sequential)")
    for text in cfg.methods:
        entry = MethodEntry.parse(text)
        method, overrides = entry.method, entry.overrides
        if entry.builtin:
            if overrides:
                raise ValueError(f"--methods entry {text!r}: overrides apply to plugin methods; edit the EasyEdit "
                                 "YAML under --easyedit-hparams instead")
            continue
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in --methods; use any of {', '.join(METHODS)} "
                             "or easyedit:<EasyEdit method>")
        if METHODS[method].needs_archive and cfg.locate:
            raise ValueError(f"{method} runs under the batch or sequential protocol, not {cfg.protocol!r}")
        if overrides:
            try:
                method_hparams(method, cfg.model, training=METHODS[method].needs_archive).replace(**overrides)
            except HyperParamsError as exc:
                raise ValueError(f"--methods entry {text!r}: {exc}") from exc
    for field in ("general_every", "general_items", "general_tokens"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "general_every" else 1):
            raise ValueError(f"--{field.replace('_', '-')} must be a {'non-negative' if field == 'general_every' else 'positive'} "
                             f"int, got {value!r}")
    if cfg.easyedit_hparams is not None and not Path(cfg.easyedit_hparams).is_dir():
        raise ValueError(f"--easyedit-hparams {cfg.easyedit_hparams} is not a folder; give EasyEdit's hparams/ "
                         "(or one laid out as METHOD/MODEL.yaml)")


