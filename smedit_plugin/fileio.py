"""Where the plugin writes, and how: atomic files, versioned directories, one writer per folder, checked targets.

* Results (JSON, PNG) go through :func:`atomic_path`: a crash never leaves a half-written file.
* Archives and COMEBA-HK states are *versioned directories* (:func:`write_version`): each save writes a
  complete new version (``v-000007/``) beside the current one, checksums every file, and publishes it by
  replacing ``manifest.json`` with one ``os.replace``; a reader verifies each file's sha256 against it.
* Ownership: a save deletes or replaces only what the manifest or its own journal records as written by
  the plugin. Names that merely look like ours (``.partial-x``, ``v-000001``) but are not recorded are
  left alone, and a folder with foreign content is refused unless the caller says to write beside it.
* One writer at a time: a lock per folder (:func:`folder_lock`, the ``filelock`` package) is held across
  write, publish and clean-up; a second writer waits up to ``SMEDIT_LOCK_TIMEOUT`` seconds and then fails
  naming the folder and the holder's process id.
* Every command checks its output targets before any work (:func:`check_output_targets`).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .errors import FolderInUseError, OutputTargetError

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
MANIFEST_FORMAT = "smedit-versioned-dir/2"
#: Manifest formats this version reads (``/1`` was written before the writer and version records were kept).
MANIFEST_FORMATS = ("smedit-versioned-dir/1", MANIFEST_FORMAT)
#: Inside every version folder: a copy of the manifest that published it, so the version loads by its own path
#: (the recovery when ``manifest.json`` is damaged).
VERSION_RECORD = "version.json"
#: The writer lock (an empty file, kept), the lock holder's record (pid, host, command; removed on release) and
#: the journal of a save in progress (every name the save will create or retire; removed when the save is done).
LOCK = ".smedit-lock"
LOCK_HOLDER = ".smedit-lock.json"
JOURNAL = ".smedit-journal.json"
BOOKKEEPING = (LOCK, LOCK_HOLDER, JOURNAL)
#: Seconds a second writer waits for a folder's lock before it fails (``$SMEDIT_LOCK_TIMEOUT``).
LOCK_TIMEOUT_ENV = "SMEDIT_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 60.0
_VERSION = re.compile(r"v-(\d{6})")
_STAGED_MANIFEST = ".smedit-manifest-{token}.tmp"
#: The ``"smedit"`` field that marks a lock-holder record or a journal as written by the plugin.
_HOLDER_MARK = "lock-holder/1"
_JOURNAL_MARK = "journal/1"


def _fsync(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk: a power cut must not publish a manifest naming empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on read-only descriptors or folders; renames still order writes
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EPERM, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_name(name: Any) -> bool:
    """A single path component (no folder, no ``..``): the only names a manifest or journal may record."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "/" not in name \
        and "\\" not in name


def _record_problem(record: Any) -> Optional[str]:
    """What is wrong with a manifest (or version record), None when it is well formed."""
    if not isinstance(record, dict):
        return f"not a JSON object but a {type(record).__name__}"
    if record.get("format") not in MANIFEST_FORMATS:
        return f"format {record.get('format')!r} is not one this smedit-plugin reads ({', '.join(MANIFEST_FORMATS)})"
    if not isinstance(record.get("kind"), str):
        return "field 'kind' is missing"
    if not (isinstance(record.get("version"), str) and _VERSION.fullmatch(record["version"])):
        return f"field 'version' = {record.get('version')!r} is not a version folder name (v-NNNNNN)"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "its 'files' map lists no files, so nothing could be checked"
    for name, entry in files.items():
        if (not _plain_name(name) or name == VERSION_RECORD or not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int)):
            return f"entry {name!r} is malformed"
    return None


def _version_records(root: Path, kind: str) -> list[Path]:
    """Version folders of ``root`` whose own version record verifies, oldest first (the recovery candidates)."""
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not (_VERSION.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        try:
            _verified_version_folder(entry, kind, ValueError, ())
        except (ValueError, OSError):
            continue
        found.append(entry)
    return found


def damaged_message(root: Path, kind: str, problem: str) -> str:
    """Say that ``root``'s manifest is damaged, that nothing was changed, and how to get the intact version back."""
    intact = _version_records(root, kind)
    if intact:
        newest = intact[-1]
        recovery = (f"intact version(s) beside it: {', '.join(p.name for p in intact)}; load the newest by its own path "
                    f"({newest}), or restore the manifest from it (copy {newest / VERSION_RECORD} to {root / MANIFEST})")
    else:
        recovery = "no version folder beside it verifies on its own; restore the folder from a copy"
    return (f"{root / MANIFEST} is damaged ({problem}); nothing was changed and nothing is deleted. Recovery: "
            f"{recovery}; or save to another folder")


def read_manifest(directory: PathLike, kind: str, error: type[Exception]) -> Optional[dict[str, Any]]:
    """The manifest of a versioned directory, None when there is none.

    Raises ``error`` when the manifest is damaged (naming the recovery), was not written by the plugin (a
    user's own ``manifest.json``), or describes another kind (an archive is never taken for a state).
    """
    root = Path(directory)
    path = root / MANIFEST
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise error(f"{path} is not a regular file (a link or a folder), so smedit-plugin did not write it and {root} "
                    "is not a saved archive or state; give another folder (nothing was changed)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(damaged_message(root, kind, f"not readable JSON: {exc}")) from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith("smedit-versioned-dir/")):
        raise error(f"{path} was not written by smedit-plugin (its 'format' is {fmt!r}, not {MANIFEST_FORMAT!r}), so "
                    f"{root} is not a saved archive or state; give another folder (nothing was changed)")
    problem = _record_problem(manifest)
    if problem:
        raise error(damaged_message(root, kind, problem))
    if manifest["kind"] != kind:
        raise error(f"{root} holds a {manifest['kind']!r}, not a {kind!r}; give another folder (nothing was changed)")
    return manifest


def _published_version(root: Path) -> Optional[str]:
    """The version the manifest names, read leniently (None when there is no readable manifest)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("version") if isinstance(manifest, dict) else None


def _verify(folder: Path, files: dict[str, Any], required: Sequence[str], source: Path, error: type[Exception]) -> None:
    """Every file ``source`` lists is in ``folder`` with its size and sha256, and ``folder`` holds nothing unlisted."""
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise error(f"{source} does not list {', '.join(unlisted)}; the manifest is damaged, restore the folder from a "
                    "copy or save it again")
    if not folder.is_dir():
        raise error(f"{folder} is missing (named in {source}); the directory is damaged, restore it from a copy or "
                    "save it again")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise error(f"{path} is missing (named in {source}); the directory is damaged, restore it from a copy or "
                        "save it again")
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise error(f"{path} fails its checksum in {source} (the file changed after it was saved: bit-rot, a "
                        "partial copy or a manual edit); restore it from a copy or save it again")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name != VERSION_RECORD)
    if extra:
        raise error(f"{folder} holds {', '.join(extra)}, which {source} does not list (added after the save, so never "
                    "checked); remove it or restore the folder from a copy")


def _verified_version_folder(folder: Path, kind: str, error: type[Exception], required: Sequence[str]) -> Path:
    """A version folder loaded by its own path, checked against the version record inside it."""
    path = folder / VERSION_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON ({exc}); this version folder cannot be checked") from exc
    problem = _record_problem(record)
    if problem:
        raise error(f"{path} is damaged ({problem}); this version folder cannot be checked")
    if record["kind"] != kind:
        raise error(f"{folder} holds a {record['kind']!r}, not a {kind!r}")
    if record["version"] != folder.name:
        raise error(f"{path} describes version {record['version']}, not this folder ({folder.name}); it was copied "
                    "from elsewhere")
    _verify(folder, record["files"], required, path, error)
    return folder


def is_versioned_dir(directory: PathLike) -> bool:
    """True for a versioned directory (it has a manifest) or one of its version folders (it has a version record)."""
    p = Path(directory)
    return os.path.lexists(p / MANIFEST) or (p / VERSION_RECORD).is_file()


def current_version(directory: PathLike, kind: str, error: type[Exception], required: Sequence[str] = ()) -> Path:
    """The folder of the published version, every file checked against the manifest's sha256 and size.

    ``directory`` may also be a version folder itself (``DIR/v-000003``, checked against its version record).
    A version retired by a concurrent save while it was being read is looked up again in the new manifest.
    """
    root = Path(directory)
    attempts = 3
    while True:
        attempts -= 1
        manifest = read_manifest(root, kind, error)
        if manifest is None:
            if (root / VERSION_RECORD).is_file():
                return _verified_version_folder(root, kind, error, required)
            raise error(f"no {kind} at {root} (no {MANIFEST})")
        folder = root / manifest["version"]
        try:
            _verify(folder, manifest["files"], required, root / MANIFEST, error)
            return folder
        except error:
            if attempts == 0 or _published_version(root) == manifest["version"]:
                raise


# -- ownership -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FolderContents:
    """A folder's entries sorted by who wrote them (:func:`inspect_folder`)."""

    manifest: Optional[dict[str, Any]]  # the valid manifest of the expected kind; None when there is none
    leftovers: tuple[str, ...]  # names the journal of an interrupted save records as its own, not published
    foreign: tuple[str, ...]  # everything the plugin has no record of writing (never deleted or replaced)
    retire: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # leftover version -> the files it wrote


def _check_bookkeeping(path: Path) -> None:
    """Refuse a file at one of the plugin's bookkeeping names that the plugin did not write."""
    if not os.path.lexists(path):
        return
    ours = path.is_file() and not path.is_symlink()
    if ours and path.name == LOCK:
        ours = path.stat().st_size == 0
    elif ours:
        ours = _read_mark(path) is not None
    if not ours:
        raise FileExistsError(f"{path} was not written by smedit-plugin (it uses this name for its "
                              f"{'lock' if path.name == LOCK else 'records'}); move it away or give another folder "
                              "(nothing was changed)")


def _read_mark(path: Path) -> Optional[dict[str, Any]]:
    """A lock-holder record or journal of the plugin ({} when empty: a write cut short), None when not ours."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    mark = _HOLDER_MARK if path.name == LOCK_HOLDER else _JOURNAL_MARK
    if not isinstance(data, dict) or data.get("smedit") != mark:
        return None
    if path.name == JOURNAL and not _journal_names_ok(data):
        return None
    return data


def _journal_names_ok(journal: dict[str, Any]) -> bool:
    """Whether a journal records only plain names (never the manifest or a bookkeeping file)."""
    def ok(name: Any) -> bool:
        return _plain_name(name) and name != MANIFEST and name not in BOOKKEEPING

    names, retire = journal.get("names"), journal.get("retire", {})
    return (isinstance(names, list) and all(map(ok, names)) and isinstance(retire, dict)
            and all(ok(v) and isinstance(files, list) and all(map(_plain_name, files)) for v, files in retire.items()))


def _write_mark(path: Path, data: dict[str, Any]) -> None:
    """Write a small record in one ``write`` call (a kill leaves it whole or empty, never half written)."""
    blob = (json.dumps(data) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)


def inspect_folder(directory: PathLike, kind: str, error: type[Exception]) -> FolderContents:
    """Sort ``directory``'s entries into the published version, an interrupted save's leftovers and foreign entries.

    Ours are only: ``manifest.json``, the version it names, the bookkeeping files, and the names the journal
    of an interrupted save recorded before creating them. Raises ``error`` for a damaged manifest or one of
    another kind, FileExistsError for a file where the folder should be or a bookkeeping name that is not ours.
    """
    root = Path(directory)
    if not os.path.lexists(root):
        return FolderContents(None, (), ())
    if not root.is_dir():
        raise FileExistsError(f"{root} is an existing file{' (a dangling link)' if root.is_symlink() else ''} where a "
                              "folder goes; give another path (nothing was changed)")
    manifest = read_manifest(root, kind, error)
    for name in BOOKKEEPING:
        _check_bookkeeping(root / name)
    journal = (_read_mark(root / JOURNAL) or {}) if os.path.lexists(root / JOURNAL) else {}
    published = manifest["version"] if manifest else None
    recorded = set(journal.get("names", ())) | set(journal.get("retire", {}))
    ours = {MANIFEST, *BOOKKEEPING, *recorded} | ({published} if published else set())
    names = sorted(os.listdir(root))
    return FolderContents(manifest, tuple(n for n in names if n in recorded and n != published),
                          tuple(n for n in names if n not in ours), dict(journal.get("retire", {})))


def foreign_message(root: Path, foreign: Sequence[str], flag: str) -> str:
    """Refuse a folder holding entries the plugin did not write, saying what to do."""
    shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
    lookalike = [n for n in foreign if _VERSION.fullmatch(n) or n.startswith((".partial-", f".{MANIFEST}.", ".smedit"))]
    note = (f" ({', '.join(lookalike[:3])} only look like a save's own names: nothing records them as written by "
            "smedit-plugin, so they are treated as yours)") if lookalike else ""
    return (f"{root} holds entries smedit-plugin did not write: {shown}{note}; give an empty or new folder, or pass "
            f"{flag} to write beside them (they are never deleted or changed)")


def leftovers(directory: PathLike) -> list[Path]:
    """What interrupted saves recorded in their journal and left in ``directory`` (removed by the next save)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    journal = (_read_mark(root / JOURNAL) if (root / JOURNAL).is_file() else None) or {}
    published = _published_version(root)
    recorded = set(journal.get("names", ())) | set(journal.get("retire", {}))
    return [root / n for n in sorted(recorded) if n != published and os.path.lexists(root / n)]


def _remove(path: Path) -> None:
    """Delete an entry this save created (a version folder being written, the staged manifest)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _retire(folder: Path, files: Sequence[str]) -> None:
    """Delete a superseded version: only the files its manifest listed and its version record, then the folder if
    that left it empty (a file someone added inside is kept, with the folder, and named in a warning)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for name in [*files, VERSION_RECORD]:
        (folder / name).unlink(missing_ok=True)
    kept = sorted(p.name for p in folder.iterdir())
    if kept:
        warnings.warn(f"{folder} was superseded but is kept: it holds {', '.join(kept)}, which smedit-plugin did not "
                      "write", stacklevel=4)
    else:
        folder.rmdir()


# -- one writer at a time ---------------------------------------------------------------------

@dataclasses.dataclass
class _Hold:
    pid: int
    lock: Any


#: Folders whose lock this process holds (by real path), so nested saves of one run do not wait on themselves.
_HELD: dict[str, _Hold] = {}


def lock_timeout() -> float:
    """``$SMEDIT_LOCK_TIMEOUT`` seconds, else :data:`DEFAULT_LOCK_TIMEOUT_S`."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"${LOCK_TIMEOUT_ENV}={raw!r} must be a number of seconds >= 0")
    return value


def _in_use_message(root: Path, waited: float, timeout: float) -> str:
    holder = _read_mark(root / LOCK_HOLDER) if (root / LOCK_HOLDER).is_file() else None
    if holder and isinstance(holder.get("pid"), int):
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
        who = f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('command', '?')}, since {since})"
    else:
        who = "another process (it has not recorded its id yet)"
    return (f"{root} is in use by {who}; waited {waited:.1f} s for it to finish writing. Wait until it is done, give "
            f"another folder, or set ${LOCK_TIMEOUT_ENV} (now {timeout:g} s) to wait longer")


@contextmanager
def folder_lock(directory: PathLike, *, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold ``directory``'s writer lock (created if missing); re-entrant within one process.

    A second process waits up to ``timeout`` (default :func:`lock_timeout`) and then raises
    :class:`~smedit_plugin.errors.FolderInUseError` naming the folder and the holder's pid, which the
    holder writes beside the lock (``.smedit-lock.json``).
    """
    from filelock import FileLock, Timeout

    root = Path(directory)
    key = os.path.realpath(root)
    hold = _HELD.get(key)
    if hold is not None and hold.pid == os.getpid():
        yield
        return
    if os.path.lexists(root) and not root.is_dir():
        raise FileExistsError(f"{root} is an existing file where a folder goes; give another path")
    root.mkdir(parents=True, exist_ok=True)
    _check_bookkeeping(root / LOCK)
    _check_bookkeeping(root / LOCK_HOLDER)
    wait = lock_timeout() if timeout is None else timeout
    lock = FileLock(str(root / LOCK))
    start = time.monotonic()
    try:
        lock.acquire(timeout=wait, poll_interval=0.05)
    except Timeout:
        raise FolderInUseError(_in_use_message(root, time.monotonic() - start, wait)) from None
    _HELD[key] = _Hold(os.getpid(), lock)
    try:
        _write_mark(root / LOCK_HOLDER, {"smedit": _HOLDER_MARK, "pid": os.getpid(), "host": socket.gethostname(),
                                         "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:3]) or "python",
                                         "since": time.time()})
        yield
    finally:
        del _HELD[key]
        try:
            (root / LOCK_HOLDER).unlink(missing_ok=True)
        finally:
            lock.release()


# -- saving a version ------------------------------------------------------------------------

def _writer() -> dict[str, Any]:
    from ._version import __version__

    return {"package": "smedit-plugin", "version": __version__, "pid": os.getpid(), "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _publish(root: Path, record: dict[str, Any], staged: Path) -> None:
    """Replace ``manifest.json`` with ``record`` in one ``os.replace`` (the staged file's name is in the journal)."""
    os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
    staged.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _fsync(staged)
    os.replace(staged, root / MANIFEST)
    _fsync(root)


def _roll_back(root: Path, previous: Optional[dict[str, Any]], folder: Path, staged: Path) -> None:
    """Undo a save that failed: the previous manifest back in place first, then the new folder removed."""
    if _published_version(root) == folder.name:
        if previous is not None:
            staged.unlink(missing_ok=True)
            _publish(root, previous, staged)
        else:
            (root / MANIFEST).unlink()
    _remove(folder)
    staged.unlink(missing_ok=True)


def write_version(directory: PathLike, kind: str, write: Callable[[Path], None], error: type[Exception], *,
                  required: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Publish a new version of ``directory``: ``write(folder)`` fills a fresh version folder, one rename publishes it.

    Under the folder's lock: the folder is inspected (a damaged manifest or one of another kind is
    refused, entries the plugin did not write are refused unless ``overwrite``, then left alone); the
    names this save will create or retire are recorded in the journal before any is created; the new
    version is written, checksummed, published and read back verified; only then is the previous
    version removed. An exception or Ctrl-C at any step leaves the previous version published bit for
    bit; a killed process leaves only journal-recorded names, which the next save removes.
    """
    root = Path(directory)
    early = inspect_folder(root, kind, error)  # refuse before the lock file is created in a folder that is not ours
    if early.foreign and not overwrite:
        raise FileExistsError(foreign_message(root, early.foreign, "overwrite=True"))
    with folder_lock(root):
        contents = inspect_folder(root, kind, error)
        if contents.foreign and not overwrite:
            raise FileExistsError(foreign_message(root, contents.foreign, "overwrite=True"))
        if contents.leftovers:
            warnings.warn(f"{root}: removing what an interrupted save left behind: {', '.join(contents.leftovers)} "
                          "(recorded in its journal; the published version is untouched)", stacklevel=3)
        for name in contents.leftovers:
            if name in contents.retire:
                _retire(root / name, contents.retire[name])
            else:
                _remove(root / name)
        previous = contents.manifest
        numbers = [int(m.group(1)) for name in os.listdir(root) if (m := _VERSION.fullmatch(name))]
        folder = root / f"v-{max(numbers, default=0) + 1:06d}"
        staged = root / _STAGED_MANIFEST.format(token=secrets.token_hex(8))
        retire = {previous["version"]: sorted(previous["files"])} if previous else {}
        _write_mark(root / JOURNAL, {"smedit": _JOURNAL_MARK, "pid": os.getpid(), "kind": kind,
                                     "names": [folder.name, staged.name], "retire": retire})
        os.mkdir(folder)
        try:
            write(folder)
            files = {}
            for path in sorted(folder.iterdir()):
                _fsync(path)
                files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
            record = {"format": MANIFEST_FORMAT, "kind": kind, "version": folder.name, "files": files,
                      "writer": _writer()}
            (folder / VERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            _fsync(folder / VERSION_RECORD)
            _fsync(folder)
            _publish(root, record, staged)
            if current_version(root, kind, error, required) != folder:  # read back, every checksum verified
                raise error(f"{root / MANIFEST} does not name the version just written ({folder.name})")
        except BaseException:
            _roll_back(root, previous, folder, staged)
            (root / JOURNAL).unlink(missing_ok=True)
            raise
        for name, files in retire.items():
            _retire(root / name, files)
        (root / JOURNAL).unlink()
    return folder


# --------------------------------------------------------------------------------------------
# output targets of the commands
# --------------------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    here = path.absolute()
    while not os.path.lexists(here) and here != here.parent:
        here = here.parent
    return here


def _folder_problem(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder`` (or the folders that would be made for it); None when they can."""
    if os.path.lexists(folder) and not folder.exists():
        return f"{folder} is a link to nothing (dangling); give a real folder"
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is an existing file where a folder is needed"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def file_target_problem(path: PathLike) -> Optional[str]:
    """Why a result file cannot be written at ``path``; None when it can."""
    p = Path(path)
    if p.is_symlink():
        return f"{p} is a symbolic link (to {os.readlink(p)}); give the path of a regular file (results are never " \
               "written through a link)"
    if p.is_dir():
        return f"{p} is an existing folder where a file goes; give a file path such as {p / 'results.json'}"
    if os.path.lexists(p) and not p.is_file():
        return f"{p} is not a regular file"
    return _folder_problem(p.parent)


def folder_target_problem(path: PathLike) -> Optional[str]:
    """Why a folder of results cannot be written at ``path``; None when it can."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        return f"{p} is an existing file where a folder goes" + (" (a dangling link)" if p.is_symlink() else "")
    return _folder_problem(p)


def check_output_targets(*, files: Optional[dict[str, Optional[PathLike]]] = None,
                         folders: Optional[dict[str, Optional[PathLike]]] = None) -> None:
    """Refuse, before any work, output targets a command could not write: ``{"--out": path, ...}`` (None skipped).

    Every command that writes calls this first thing, so a wrong target costs a second, not a run: not
    writable, an existing folder where a file goes, an existing file where a folder goes, a link.
    """
    problems = []
    for targets, problem_of in ((files or {}, file_target_problem), (folders or {}, folder_target_problem)):
        for flag, path in targets.items():
            problem = problem_of(path) if path is not None else None
            if problem:
                problems.append(f"{flag} {problem}" if problem.startswith(str(path)) else f"{flag} {path}: {problem}")
    if problems:
        raise OutputTargetError("; ".join(problems) + " (nothing was run)")


def inside(folder: PathLike, path: PathLike) -> bool:
    """Whether ``path`` stays inside ``folder`` once every link on the way is followed."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
