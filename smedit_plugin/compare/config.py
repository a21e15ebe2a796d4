"""``smedit compare`` settings: the config, the ``--methods`` mini-language, and the checks made before any work.

Every bad setting is reported here, before a model is loaded or a weight touched.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from ..hparams import HyperParamsError, load_method_hparams
from ..methods import COMPARE_DEFAULT, METHODS
from ..protocols import Protocol, protocol

ROW_FIELDS = ("method", "model", "dataset", "protocol", "n_edits", "num_seq", "efficacy", "generalization",
              "specificity", "portability", "train_s_per_edit", "edit_s_per_edit", "peak_rss_mb")
#: ES, GS, LS and PS; ``portability`` is None in every row when the records have no portability questions.
METRIC_NAMES = ("efficacy", "generalization", "specificity", "portability")
#: What the COMEBA-HK paper's ``average`` averages: reliability, generality, locality.
AVERAGED_METRICS = ("efficacy", "generalization", "specificity")
#: ``--methods`` prefix of EasyEdit's own methods (``easyedit:FT``), run through its ``BaseEditor``.
EASYEDIT_PREFIX = "easyedit:"


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
    checkpoints: tuple[int, ...] = ()
    progress: bool = True
    easyedit_hparams: Optional[Path] = None
    via_easyedit: bool = False
    general_every: int = 0
    general_items: int = 100
    general_tokens: int = 4096

    @property
    def declared(self) -> Protocol:
        """The declaration of :attr:`protocol` (:data:`smedit_plugin.protocols.PROTOCOLS`)."""
        return protocol(self.protocol)

    @property
    def sizes(self) -> tuple[int, int]:
        """``(facts edited in all, facts per chunk)``."""
        return self.declared.sizes(self.n_edits, self.num_seq, self.batch_size)

    @property
    def chunks(self) -> int:
        total, chunk = self.sizes
        return -(-total // chunk)


def split_method(name: str) -> tuple[bool, str]:
    """``("easyedit:FT")`` -> ``(True, "FT")``; plugin methods -> ``(False, name)``."""
    if name.lower().startswith(EASYEDIT_PREFIX):
        inner = name[len(EASYEDIT_PREFIX):].strip()
        if not inner:
            raise ValueError(f"--methods entry {name!r} names no EasyEdit method; write e.g. easyedit:FT")
        return True, inner
    return False, name


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
    try:
        return name, parse_overrides([] if inner is None else inner.split(","))
    except ValueError as err:
        raise ValueError(f"--methods entry {entry!r}: {err}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["rank=8", "lr=1e-3", "name=x"]`` -> ``{"rank": 8, "lr": 0.001, "name": "x"}`` (values parsed as JSON when
    they can be, else kept as text); blank items are skipped."""
    overrides: dict[str, Any] = {}
    for item in (i for i in items if i.strip()):
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"override {item!r} is not field=value")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return overrides


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


def _check_counts(cfg: CompareConfig) -> None:
    for field, least in (("n_edits", 1), ("num_seq", 1), ("batch_size", 1), ("curve_every", 0),
                         ("general_every", 0), ("general_items", 1), ("general_tokens", 1)):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"--{field.replace('_', '-')} must be an integer >= {least}, got {value!r}")
    total = cfg.sizes[0]
    for mark in cfg.checkpoints:
        if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark <= total:
            raise ValueError(f"--checkpoints must be edit counts between 1 and the {total} facts edited, got {mark!r}")


def check_config(cfg: CompareConfig) -> None:
    """Every bad setting is reported before a model is loaded or a weight touched."""
    declared = cfg.declared
    if not cfg.methods:
        raise ValueError(f"--methods is empty; name at least one method (e.g. --methods {','.join(COMPARE_DEFAULT)})")
    _check_counts(cfg)
    if declared.one_chunk and cfg.num_seq != 1:
        raise ValueError(f"--protocol {declared.name} edits one batch: use --num-seq 1 (or --protocol sequential)")
    for text in cfg.methods:
        entry = MethodEntry.parse(text)
        if entry.builtin:
            if entry.overrides:
                raise ValueError(f"--methods entry {text!r}: overrides apply to plugin methods; edit the EasyEdit "
                                 "YAML under --easyedit-hparams instead")
            continue
        if entry.method not in METHODS:
            raise ValueError(f"unknown method {entry.method!r} in --methods; use any of {', '.join(METHODS)} "
                             "or easyedit:<EasyEdit method>")
        if entry.overrides:
            try:
                load_method_hparams(entry.method, cfg.model, variant=declared.variant).replace(**entry.overrides)
            except HyperParamsError as exc:
                raise ValueError(f"--methods entry {text!r}: {exc}") from exc
    if cfg.easyedit_hparams is not None and not Path(cfg.easyedit_hparams).is_dir():
        raise ValueError(f"--easyedit-hparams {cfg.easyedit_hparams} is not a folder; give EasyEdit's hparams/ "
                         "(or one laid out as METHOD/MODEL.yaml)")
