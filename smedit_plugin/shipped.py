"""Files that ship inside the package: the YAML hparams tree and the data samples, found with importlib.resources.

The repository's top-level ``hparams/`` folder is the one source of the YAMLs; ``setup.cfg`` maps it
into the package as ``smedit_plugin.hparams_files``, so a wheel and an editable install read the
same files from any working directory. Data files live in ``smedit_plugin/resources``.
"""
from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Union

from .fileio import inside

HPARAMS_PACKAGE = "smedit_plugin.hparams_files"
#: ``$SMEDIT_HPARAMS_DIR`` replaces the shipped tree (a folder in EasyEdit's ``hparams/`` layout).
HPARAMS_DIR_ENV = "SMEDIT_HPARAMS_DIR"
#: A shipped name: ``METHOD/model`` or ``TRAINING/METHOD/model`` (``.yaml`` optional).
_NAME = re.compile(r"^(TRAINING/)?[A-Za-z0-9^_.+-]+/[A-Za-z0-9_.+-]+?(\.yaml)?$")
YAML_SUFFIX = ".yaml"


def hparams_root() -> Path:
    """The hparams tree in use: ``$SMEDIT_HPARAMS_DIR`` if set, else the YAMLs shipped in the package."""
    env = os.environ.get(HPARAMS_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${HPARAMS_DIR_ENV}={env!r} is not a folder; unset it to use the shipped hparams")
        return path
    return Path(str(resources.files(HPARAMS_PACKAGE)))


#: The package's resource folder (ZsRE samples, GLUE-style subsets, WikiText-2; see resources/SAMPLE.md).
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
#: The WikiText-2 test split: MEMIT/COMEBA-HK covariance corpus and the perplexity text.
WIKITEXT2_TEST = RESOURCES_DIR / "text" / "wikitext-2-raw-test.txt"
#: The GLUE-style general-capability subsets.
GLUE_DIR = RESOURCES_DIR / "glue"


def shipped_names(root: Union[Path, None] = None) -> list[str]:
    """Every YAML of the tree as ``METHOD/model`` or ``TRAINING/METHOD/model``, sorted."""
    base = root or hparams_root()
    return sorted(p.relative_to(base).with_suffix("").as_posix() for p in base.rglob(f"*{YAML_SUFFIX}"))


def is_shipped_name(value: Union[str, os.PathLike]) -> bool:
    """True for a string shaped like a shipped name (no ``.``/``..`` part) that is not an existing file."""
    return (isinstance(value, str) and bool(_NAME.match(value)) and not _climbs(value)
            and not Path(value).exists())


def _climbs(name: str) -> bool:
    """Whether a name has a ``.`` or ``..`` part (it could lead out of the hparams tree)."""
    return any(part.strip(".") == "" for part in name.split("/"))


def shipped_hparams_path(name: str) -> Path:
    """The YAML file behind ``name`` (``SMEdit/llama3-8b``, ``TRAINING/MALMEN2/smollm2-135m``)."""
    import difflib

    stem = name[: -len(YAML_SUFFIX)] if name.endswith(YAML_SUFFIX) else name
    root = hparams_root()
    path = root / f"{stem}{YAML_SUFFIX}"
    if _climbs(stem) or not _NAME.match(name) or not inside(root, path):
        raise FileNotFoundError(f"{name!r} is not a shipped hparams name (METHOD/model or TRAINING/METHOD/model inside "
                                f"{root}); a lookup never leaves that folder")
    if path.is_file():
        return path
    names = shipped_names()
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `smedit hparams` lists them"
    raise FileNotFoundError(f"no shipped hparams {stem!r}{hint}")


def method_yaml(method: str, model_key: str, *, training: bool = False, variant: str = "") -> Path:
    """The one answer to "which YAML for method X on model Y": ``[TRAINING/]METHOD/<model_key><variant>.yaml``
    of the tree in use, or the plain ``<model_key>.yaml`` when that variant (``-seq``, ``-demo``) is not shipped."""
    folder = hparams_root() / ("TRAINING" if training else "") / method
    for stem in dict.fromkeys((f"{model_key}{variant}", model_key)):
        path = folder / f"{stem}{YAML_SUFFIX}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no hparams file {folder / (model_key + YAML_SUFFIX)} for method {method!r} and model "
                            f"{model_key!r}{' (training)' if training else ''}; `smedit hparams` lists the shipped ones")


def easyedit_hparams_root() -> Path:
    """EasyEdit-format YAMLs of EasyEdit's own methods for the plugin's CPU models (``hparams/EASYEDIT``)."""
    return hparams_root() / "EASYEDIT"


def export_hparams(out: Path) -> list[Path]:
    """Copy the YAML tree into ``out`` in EasyEdit's ``hparams/`` layout.

    Every target is checked before the first is written: an existing file or link at a target, or a link on
    the way to one, is refused, so a write never follows a link out of ``out``. Each file is created new
    (``O_EXCL | O_NOFOLLOW``), so nothing existing is overwritten even if it appears meanwhile.
    """
    root = hparams_root()
    names = shipped_names(root)
    targets = [out / f"{name}{YAML_SUFFIX}" for name in names]
    for target in targets:
        rel = target.relative_to(out)
        links = [out / p for p in reversed(rel.parents) if str(p) != "." and (out / p).is_symlink()]
        if links or os.path.lexists(target):
            what = (f"{links[0]} is a symbolic link (to {os.readlink(links[0])}); a write through it could leave {out}"
                    if links else f"{target} already exists" + (" (a symbolic link)" if target.is_symlink() else ""))
            raise FileExistsError(f"--export {what}; export into an empty folder or remove it first (nothing was written)")
    for name, target in zip(names, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not inside(out, target.parent):
            raise FileExistsError(f"--export {target.parent} leads outside {out}; nothing more was written")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write((root / f"{name}{YAML_SUFFIX}").read_bytes())
    return targets
