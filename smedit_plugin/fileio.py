"""The cache root and atomic writes: a crash never leaves a half-written result, archive, state or cache.

Archives and COMEBA-HK states are *versioned directories*: each save writes a complete new version
(``v-000007/``) beside the current one, checksums every file, and then publishes it by replacing
``manifest.json`` with one ``os.replace``. At every instant the manifest names a complete version
(the old one until the replace, the new one after), and a reader verifies each file's sha256
against it. Anything else left in the directory by an interrupted save is found and removed by
the next save.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
#: The environment variable naming the root of every cache the plugin writes.
CACHE_ENV = "SMEDIT_CACHE"


def cache_dir() -> Path:
    """Root of the plugin's caches (converted models, archives, statistics): ``$SMEDIT_CACHE`` or ``~/.cache/smedit``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "smedit"


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_safetensors_atomic(tensors: dict, path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file (tensors made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------------------------
# versioned directories (archives, COMEBA-HK states)
# --------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "smedit-versioned-dir/1"
_VERSION = re.compile(r"v-(\d{6})")
_PARTIAL_PREFIX = ".partial-"


def _fsync(path: Path) -> None:
    """Flush a written file to disk (a power cut must not publish a manifest naming empty files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on read-only descriptors; the rename still orders writes
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EPERM):
            raise
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: PathLike, kind: str, error: type[Exception]) -> Optional[dict[str, Any]]:
    """The manifest of a versioned directory, None when there is none; ``error`` if it is damaged or of another kind."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is damaged ({exc}); restore the directory from a copy or write it again") from exc
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
          and isinstance(manifest.get("version"), str) and _VERSION.fullmatch(manifest["version"])
          and isinstance(manifest.get("files"), dict))
    if not ok:
        raise error(f"{path} is not a {MANIFEST_FORMAT} manifest; restore the directory from a copy or write it again")
    if manifest.get("kind") != kind:
        raise error(f"{Path(directory)} holds a {manifest.get('kind')!r}, not a {kind!r}")
    return manifest


def current_version(directory: PathLike, kind: str, error: type[Exception]) -> Path:
    """The folder of the published version, every file checked against the manifest's sha256 and size."""
    root = Path(directory)
    manifest = read_manifest(root, kind, error)
    if manifest is None:
        raise error(f"no {kind} at {root} (no {MANIFEST})")
    folder = root / manifest["version"]
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or Path(name).name != name or name in (".", ".."):
            raise error(f"{root / MANIFEST}: entry {name!r} is malformed; restore the directory from a copy or write "
                        "it again")
        path = folder / name
        if not path.is_file():
            raise error(f"{path} is missing (named in {root / MANIFEST}); the directory is damaged, "
                        "restore it from a copy or write it again")
        if path.stat().st_size != entry.get("bytes") or sha256_of(path) != entry.get("sha256"):
            raise error(f"{path} fails its checksum in {root / MANIFEST} (the file changed after it was saved: "
                        "bit-rot, a partial copy or a manual edit); restore it from a copy or write it again")
    return folder


def _published_version(root: Path) -> Optional[str]:
    """The version the manifest names, read leniently (None when there is no readable manifest)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("version") if isinstance(manifest, dict) else None


def leftovers(directory: PathLike) -> list[Path]:
    """What interrupted saves left in a versioned directory: versions the manifest does not name, partial folders."""
    root = Path(directory)
    if not root.is_dir():
        return []
    published = _published_version(root)
    return sorted(p for p in root.iterdir()
                  if (p.name.startswith(_PARTIAL_PREFIX) or p.name.startswith(f".{MANIFEST}.")
                      or (_VERSION.fullmatch(p.name) and p.name != published)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(directory: PathLike) -> list[Path]:
    """Delete what :func:`leftovers` finds, with a warning naming it; returns the removed paths."""
    found = leftovers(directory)
    if found:
        warnings.warn(f"{Path(directory)}: removing what an interrupted save left behind: "
                      f"{', '.join(p.name for p in found)} (the published version is untouched)", stacklevel=2)
    for path in found:
        _remove(path)
    return found


def write_version(directory: PathLike, kind: str, write: Callable[[Path], None], error: type[Exception]) -> Path:
    """Publish a new version of ``directory``: ``write(folder)`` fills a fresh folder, then one rename swaps it in.

    If anything fails or is interrupted before the manifest is replaced, the new folder is removed and
    the directory still holds its previous version, bit for bit. Returns the new version's folder.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_manifest(root, kind, error)
    except error:
        previous = None  # a damaged manifest is replaced by this save
    remove_leftovers(root)
    number = int(previous["version"][2:]) + 1 if previous else 1
    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=root))
    folder = root / f"v-{number:06d}"
    try:
        write(partial)
        files = {}
        for path in sorted(partial.iterdir()):
            _fsync(path)
            files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        os.replace(partial, folder)
        write_json_atomic(root / MANIFEST, {"format": MANIFEST_FORMAT, "kind": kind, "version": folder.name,
                                            "files": files})
    except BaseException:
        _remove(partial)
        if _published_version(root) != folder.name:
            _remove(folder)
        raise
    if previous is not None:
        _remove(root / previous["version"])
    return folder


def is_versioned_dir(directory: PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()
