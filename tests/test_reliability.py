"""Issue 26, the second reliability review: each group below keeps one class of its "Why" list closed.

1. reserved-looking names in a user's folder are never deleted;  2. a ``manifest.json`` the plugin did not
write, or a saved folder of the other kind, is never replaced;  3. a damaged manifest never leads to deleting
the intact version;  4. one writer at a time (real concurrent processes);  5. every output target is checked
before the work;  6. resuming with other settings is refused;  7. (tests/test_distributed.py) ranks with other
settings fail at start;  8. integrity holes. The guarantee list with these names is docs/guarantees.md.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reliability_workers import (REQUESTS, archive_save_after, comeba_hparams, editor_tensors, hold_lock,
                                 seeded_editor, slow_archive_save, smedit_hparams)
from smedit_plugin import cli, fileio
from smedit_plugin.comeba_hk import apply_comeba_hk_to_model, load_hook_state, save_hook_state
from smedit_plugin.comeba_hk.state import STATE_JSON, STATE_TENSORS, StateError, find_state, state_parameters
from smedit_plugin.hparams import HyperParamsError, load_hparams
from smedit_plugin.hypernet.archive import ArchiveError, load_archive, read_meta, save_archive
from smedit_plugin.hypernet.training import train_hypernet
from smedit_plugin.records import load_records, sample_path
from smedit_plugin.smedit.main import apply_smedit_to_model

pytestmark = pytest.mark.usefixtures("direct_call_semantics")


@pytest.fixture(scope="module")
def tiny4(tiny):
    return tiny("smollm2", n_layers=4)


@pytest.fixture()
def model(tiny4):
    return copy.deepcopy(tiny4[0])


@pytest.fixture()
def tok(tiny4):
    return tiny4[1]


@pytest.fixture(scope="module")
def edited(tiny4):
    """A copy of the model carrying a COMEBA-HK state after one edit (its state is what the tests save)."""
    twin = copy.deepcopy(tiny4[0])
    apply_comeba_hk_to_model(twin, tiny4[1], REQUESTS, comeba_hparams())
    return twin


# -- helpers ---------------------------------------------------------------------------------

#: The plugin's bookkeeping files in a saved folder, as docs/guarantees.md names them for users.
BOOKKEEPING = (".smedit-lock", ".smedit-lock.json", ".smedit-journal.json")

def plant(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def read_back(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in files if (root / rel).is_file()}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the plugin's empty lock file left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != BOOKKEEPING[0]}


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in BOOKKEEPING)


def published(root: Path) -> Path:
    return root / json.loads((root / fileio.MANIFEST).read_text())["version"]


def resign(root: Path, name: str, change) -> None:
    """Change a file of the published version and re-sign the manifest (a well-formed but altered archive/state)."""
    manifest = json.loads((root / fileio.MANIFEST).read_text())
    file = root / manifest["version"] / name
    change(file)
    manifest["files"][name] = {"sha256": fileio.sha256_of(file), "bytes": file.stat().st_size}
    (root / fileio.MANIFEST).write_text(json.dumps(manifest))


def edit_tensors(fn):
    def change(file: Path) -> None:
        tensors = load_file(str(file))
        fn(tensors)
        save_file(tensors, str(file))
    return change


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(before) and all(torch.equal(now[n], v) for n, v in before.items())
    assert find_state(model) is None


def no_model_load(monkeypatch) -> None:
    import smedit_plugin.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output targets were checked")

    monkeypatch.setattr(models, "load_model_and_tokenizer", refuse)


def tiny_train_yaml(tmp_path: Path, model_name: str, **changes: Any) -> Path:
    """A TRAINING yaml of SMEdit on a tiny model: one unit of 4 edits."""
    hp = smedit_hparams(model_name=model_name, n_edits=4, max_steps=1, **changes)
    path = tmp_path / "smedit.yaml"
    path.write_text(yaml.safe_dump(hp.to_dict()))
    return path


@pytest.fixture(scope="module")
def model_dir(tiny4, tmp_path_factory) -> Path:
    """The tiny model saved as a Hugging Face folder, for commands that load their model by name."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny4[0].save_pretrained(path)
    tiny4[1].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(json.loads(sample_path("zsre_sample").read_text())[:8]))
    return path


# ============================================================================================
# 1. reserved-looking names in a user's folder
# ============================================================================================

LOOKALIKES = {".partial-thesis/chapter1.tex": b"\\chapter{One}\n", "v-000001/results.csv": b"a,b\n1,2\n",
              ".manifest.json.bak": b"my own notes\n", ".smedit-manifest-0123.tmp": b"mine too\n",
              "notes.txt": b"precious\n"}


def test_reserved_names_in_a_users_folder_are_refused_not_deleted(model, tmp_path) -> None:
    path = tmp_path / "work"
    plant(path, LOOKALIKES)
    with pytest.raises(FileExistsError, match="did not write: .*only look like a save's own names"):
        save_archive(path, seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")
    assert tree(path) == LOOKALIKES


def test_reserved_names_stay_byte_identical_when_the_save_writes_beside_them(model, tmp_path) -> None:
    path = tmp_path / "work"
    plant(path, LOOKALIKES)
    hp = smedit_hparams()
    for seed in (1, 2):
        editor = seeded_editor(model, hp, seed)
        save_archive(path, editor, model_name="tiny-smollm2", overwrite=True)
    assert read_back(path, LOOKALIKES) == LOOKALIKES
    assert published(path).name == "v-000003"  # numbered past the user's v-000001; our v-000002 was retired
    assert entries(path) == sorted({".partial-thesis", ".manifest.json.bak", ".smedit-manifest-0123.tmp", "notes.txt",
                                    "v-000001", "manifest.json", "v-000003"})
    loaded, _ = load_archive(path, model, hp)
    assert all(torch.equal(v, editor_tensors(editor)[k]) for k, v in editor_tensors(loaded).items())


def test_smedit_train_out_leaves_a_users_partial_and_version_folders_byte_identical(model_dir, records_file, tmp_path,
                                                                                   monkeypatch, capsys) -> None:
    """Acceptance: ``smedit train --out DIR`` with a user's ``.partial-x/`` and ``v-000001/``."""
    out = tmp_path / "out"
    mine = {".partial-x/draft.txt": b"draft\n", "v-000001/results.csv": b"x,y\n"}
    plant(out, mine)
    hparams = tiny_train_yaml(tmp_path, str(model_dir))
    with monkeypatch.context() as patch:
        no_model_load(patch)
        assert cli.main(["train", str(hparams), "--data", str(records_file), "--out", str(out), "--no-progress"]) == 2
    assert "did not write: .partial-x, v-000001" in capsys.readouterr().err
    assert tree(out) == mine
    assert cli.main(["train", str(hparams), "--data", str(records_file), "--out", str(out), "--no-progress",
                     "--overwrite"]) == 0
    assert read_back(out, mine) == mine and read_meta(out)["complete"] is True
    assert entries(out) == sorted([".partial-x", "manifest.json", published(out).name, "v-000001"])


def test_a_file_added_inside_a_superseded_version_is_kept(model, tmp_path) -> None:
    hp = smedit_hparams()
    path = save_archive(tmp_path / "arch", seeded_editor(model, hp, 1), model_name="tiny-smollm2")
    (published(path) / "my-notes.txt").write_text("precious")  # the version no longer loads (an unlisted file) ...
    with pytest.warns(UserWarning, match="v-000001 was superseded but is kept: it holds my-notes.txt"):
        save_archive(path, seeded_editor(model, hp, 2), model_name="tiny-smollm2")  # ... but a new one saves
    assert sorted(p.name for p in (path / "v-000001").iterdir()) == ["my-notes.txt"]
    assert (path / "v-000001" / "my-notes.txt").read_text() == "precious"
    load_archive(path, model, hp)


# ============================================================================================
# 2. a manifest.json the plugin did not write; an archive and a state are not each other
# ============================================================================================

USERS_MANIFEST = {"manifest.json": json.dumps({"name": "my data set", "files": ["a.csv"]}).encode(),
                  "a.csv": b"1,2,3\n"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_the_users_own_manifest_is_never_taken_for_a_saved_one(edited, model, tmp_path,
                                                                             overwrite) -> None:
    for name, save in (("state", lambda p: save_hook_state(edited, p, overwrite=overwrite)),
                       ("archive", lambda p: save_archive(p, seeded_editor(model, smedit_hparams(), 1),
                                                          model_name="tiny-smollm2", overwrite=overwrite))):
        path = tmp_path / name
        plant(path, USERS_MANIFEST)
        with pytest.raises(ValueError, match="manifest.json was not written by smedit-plugin"):
            save(path)
        assert tree(path) == USERS_MANIFEST


def test_an_archive_and_a_state_refuse_each_others_folder(edited, tiny4, model, tmp_path) -> None:
    hp = smedit_hparams()
    arch = save_archive(tmp_path / "arch", seeded_editor(model, hp, 1), model_name="tiny-smollm2")
    state = save_hook_state(edited, tmp_path / "state")
    arch_files, state_files = tree(arch), tree(state)
    with pytest.raises(StateError, match="holds a 'smedit-hypernet/2', not a 'smedit-comeba-hk/2'"):
        save_hook_state(edited, arch, overwrite=True)
    with pytest.raises(ArchiveError, match="holds a 'smedit-comeba-hk/2', not a 'smedit-hypernet/2'"):
        save_archive(state, seeded_editor(model, hp, 2), model_name="tiny-smollm2", overwrite=True)
    with pytest.raises(StateError, match="holds a 'smedit-hypernet/2'"):
        load_hook_state(copy.deepcopy(tiny4[0]), arch)
    assert tree(arch) == arch_files and tree(state) == state_files
    load_archive(arch, model, hp)
    load_hook_state(copy.deepcopy(tiny4[0]), state)


# ============================================================================================
# 3. a damaged manifest never deletes the intact version
# ============================================================================================

MANIFEST_DAMAGE = {
    "garbage": lambda m: m.write_text("{not json"),
    "empty": lambda m: m.write_text(""),
    "no files listed": lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "files": {}})),
    "version not a folder name": lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "version": "../x"})),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
@pytest.mark.parametrize("kind", ["archive", "state"])
def test_a_damaged_manifest_never_deletes_the_intact_version(edited, tiny4, model, tmp_path, kind, damage) -> None:
    hp = smedit_hparams()
    path = tmp_path / kind
    if kind == "archive":
        save = lambda seed: save_archive(path, seeded_editor(model, hp, seed), model_name="tiny-smollm2")  # noqa: E731
        load = lambda p: editor_tensors(load_archive(p, model, hp)[0])  # noqa: E731
        error = ArchiveError
    else:
        save = lambda seed: save_hook_state(edited, path)  # noqa: E731
        load = lambda p: {k: v.detach().clone() for k, v in  # noqa: E731
                          state_parameters(_attached(tiny4[0], p)).items()}
        error = StateError
    save(1)
    save(2)
    intact = published(path)
    good, before = load(path), tree(path)
    MANIFEST_DAMAGE[damage](path / fileio.MANIFEST)
    damaged = tree(path)
    with pytest.raises(error) as err:
        save(3)
    message = str(err.value)
    assert f"{path / fileio.MANIFEST} is damaged" in message and "nothing is deleted" in message
    assert str(intact) in message and str(intact / fileio.VERSION_RECORD) in message  # the recovery, both ways
    assert tree(path) == damaged  # nothing deleted, nothing written
    loaded = load(intact)  # the intact version loads by its own path, checked against its version record
    assert loaded.keys() == good.keys() and all(torch.equal(loaded[k], good[k]) for k in good)
    (path / fileio.MANIFEST).write_bytes((intact / fileio.VERSION_RECORD).read_bytes())  # the restore the message gives
    assert all(torch.equal(v, good[k]) for k, v in load(path).items())
    assert {k: v for k, v in tree(path).items() if k != fileio.MANIFEST} == \
        {k: v for k, v in before.items() if k != fileio.MANIFEST}


def _attached(base, folder):
    fresh = copy.deepcopy(base)
    load_hook_state(fresh, folder)
    return fresh


def test_smedit_train_refuses_a_damaged_archive_even_with_overwrite(model, tmp_path, records_file, monkeypatch,
                                                                   capsys) -> None:
    out = tmp_path / "out"
    save_archive(out, seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")
    (out / fileio.MANIFEST).write_text("{")
    before = tree(out)
    no_model_load(monkeypatch)
    hparams = tiny_train_yaml(tmp_path, "tiny-smollm2")
    assert cli.main(["train", str(hparams), "--data", str(records_file), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is damaged" in err and "v-000001" in err
    assert tree(out) == before


# ============================================================================================
# 4. one writer at a time (real processes)
# ============================================================================================

def _spawn(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def test_two_processes_saving_one_folder_at_once_both_publish(model, tmp_path) -> None:
    """The second save starts while the first is writing its weights (before it publishes): it waits for the lock."""
    path, started = tmp_path / "arch", tmp_path / "first-is-writing"
    first = _spawn(slow_archive_save, str(path), 1, str(started), str(tmp_path / "first.json"), 3.0)
    second = _spawn(archive_save_after, str(path), 2, str(started), str(tmp_path / "second.json"))
    for process in (first, second):
        process.join(240)
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second")]
    assert reports == [{"ok": True}, {"ok": True}], reports
    assert entries(path) == ["manifest.json", "v-000002"]  # the first version was published, then retired
    loaded, _ = load_archive(path, model, smedit_hparams())
    expected = editor_tensors(seeded_editor(model, smedit_hparams(), 2))
    assert all(torch.equal(v, expected[k]) for k, v in editor_tensors(loaded).items())


def test_a_second_writer_waits_then_fails_naming_the_folder_and_the_holders_pid(model, tmp_path, monkeypatch) -> None:
    from smedit_plugin.errors import FolderInUseError

    path, ready = tmp_path / "arch", tmp_path / "held"
    holder = _spawn(hold_lock, str(path), 6.0, str(ready))
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setenv(fileio.LOCK_TIMEOUT_ENV, "0.5")
    start = time.monotonic()
    with pytest.raises(FolderInUseError, match=f"{path} is in use by process {holder.pid} on .*waited 0.[5-9] s"):
        save_archive(path, seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")
    assert time.monotonic() - start < 5
    holder.join(60)
    assert holder.exitcode == 0
    save_archive(path, seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")  # free again
    assert entries(path) == ["manifest.json", "v-000001"]


def test_a_save_killed_mid_write_is_cleaned_up_by_the_next_save_and_user_entries_stay(model, tmp_path) -> None:
    path, writing = tmp_path / "arch", tmp_path / "writing"
    hp = smedit_hparams()
    save_archive(path, seeded_editor(model, hp, 1), model_name="tiny-smollm2")
    mine = {f"{k}".replace("v-000001", "v-000009"): v for k, v in LOOKALIKES.items()}
    plant(path, mine)
    child = multiprocessing.get_context("fork").Process(target=_save_then_hang, args=(path, seeded_editor(model, hp, 2),
                                                                                      writing))
    child.start()
    deadline = time.monotonic() + 60
    while not writing.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert [p.name for p in fileio.leftovers(path)] == ["v-000010"]  # recorded in the journal before it was made
    assert all(torch.equal(v, editor_tensors(seeded_editor(model, hp, 1))[k])
               for k, v in editor_tensors(load_archive(path, model, hp)[0]).items())
    with pytest.warns(UserWarning, match="interrupted save left behind: v-000010"):
        save_archive(path, seeded_editor(model, hp, 3), model_name="tiny-smollm2", overwrite=True)
    assert read_back(path, mine) == mine
    assert published(path).name == "v-000010" and fileio.leftovers(path) == []
    assert entries(path) == sorted({*(k.split("/")[0] for k in mine), "manifest.json", "v-000010"})
    assert not (path / fileio.JOURNAL).exists() and not (path / fileio.LOCK_HOLDER).exists()


def _save_then_hang(path: Path, editor, writing: Path) -> None:
    """In a forked child: start a save and stop inside its first file write until killed."""
    from smedit_plugin.hypernet import archive as archive_module

    def hang(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file
        writing.touch()
        time.sleep(600)

    archive_module.save_file = hang
    archive_module.save_archive(path, editor, model_name="tiny-smollm2", overwrite=True)


@pytest.mark.slow
def test_two_smedit_train_on_one_folder_end_in_use_or_with_two_complete_versions(model_dir, records_file,
                                                                                 tmp_path) -> None:
    """Acceptance: the same ``smedit train --out`` launched twice together: a clear "in use" or two versions."""
    out = tmp_path / "out"
    hparams = tiny_train_yaml(tmp_path, str(model_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMEDIT_LOCK_TIMEOUT": "2"}
    command = [sys.executable, "-m", "smedit_plugin.cli", "train", str(hparams), "--data", str(records_file),
               "--out", str(out), "--no-progress"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.wait(600), *run.communicate()) for run in runs]
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr, stderr[-3000:]
        assert code == 0 or (code == 2 and f"{out} is in use by process" in stderr), stderr[-3000:]
    assert sorted(code for code, _, _ in results) in ([0, 2], [0, 0])
    assert read_meta(out)["complete"] is True and entries(out) == ["manifest.json", published(out).name]


# ============================================================================================
# 5. every output target checked before the work
# ============================================================================================

#: A compare run that needs no training data (so only the targets can stop it before the model loads).
COMPARE = ["compare", "--eval-data", "{eval}", "--methods", "COMEBA-HK", "--protocol", "consecutive"]
TARGETS = [
    ("demo --out is a folder", ["demo", "--out", "{dir}"], "--out {dir} is an existing folder where a file goes"),
    ("demo --out is a link", ["demo", "--out", "{link}"], "--out {link} is a symbolic link"),
    ("compare --out is a folder", [*COMPARE, "--out", "{dir}"], "--out {dir} is an existing folder"),
    ("compare --plot is a folder", [*COMPARE, "--out", "{tmp}/r.json", "--plot", "{dir}"],
     "--plot {dir} is an existing folder"),
    ("compare --archives is a file", [*COMPARE, "--out", "{tmp}/r.json", "--archives", "{file}"],
     "--archives {file} is an existing file where a folder goes"),
    ("base-eval --out is a folder", ["base-eval", "--out", "{dir}"], "--out {dir} is an existing folder"),
    ("base-eval --out below a file", ["base-eval", "--out", "{file}/r.json"], "{file} is an existing file where a folder"),
    ("bench --out is a folder", ["bench", "--out", "{dir}"], "--out {dir} is an existing folder"),
    ("hparams --export is a file", ["hparams", "--export", "{file}"], "--export {file} is an existing file where a folder"),
    ("sweep --out is a file", ["sweep", "--eval-data", "{eval}", "--methods", "COMEBA-HK", "--out", "{file}"],
     "--out {file} is an existing file where a folder goes"),
    ("sweep --plot is a folder", ["sweep", "--eval-data", "{eval}", "--methods", "COMEBA-HK", "--out", "{tmp}/s",
                                  "--plot", "{dir}"], "--plot {dir} is an existing folder"),
    ("train --out below a file", ["train", "TRAINING/SMEdit/smollm2-135m", "--data", "{eval}", "--out", "{file}/o"],
     "--out {file}/o: {file} is an existing file where a folder"),
]


@pytest.mark.parametrize("argv,needle", [t[1:] for t in TARGETS], ids=[t[0] for t in TARGETS])
def test_output_targets_are_refused_before_any_model_loads(argv, needle, tmp_path, monkeypatch, capsys) -> None:
    slots = {"dir": tmp_path / "a-folder", "file": tmp_path / "a-file", "link": tmp_path / "a-link",
             "eval": sample_path("zsre_sample_eval"), "tmp": tmp_path}
    slots["dir"].mkdir()
    slots["file"].write_text("precious")
    (tmp_path / "elsewhere.json").write_text("not yours")
    slots["link"].symlink_to(tmp_path / "elsewhere.json")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    no_model_load(monkeypatch)
    assert cli.main([a.format(**slots) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle.format(**slots) in err and "nothing was run" in err
    assert tree(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("argv", [["demo", "--out", "{ro}/r.json"], ["base-eval", "--out", "{ro}/r.json"],
                                  ["bench", "--out", "{ro}/r.json"], ["hparams", "--export", "{ro}/hp"],
                                  [*COMPARE, "--out", "{ro}/r.json"]],
                         ids=["demo", "base-eval", "bench", "hparams", "compare"])
def test_a_read_only_output_folder_is_refused_before_any_model_loads(argv, tmp_path, monkeypatch, capsys) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    no_model_load(monkeypatch)
    try:
        assert cli.main([a.format(ro=readonly, eval=sample_path("zsre_sample_eval"), tmp=tmp_path) for a in argv]) == 2
    finally:
        readonly.chmod(0o755)
    assert f"{readonly} is not writable" in capsys.readouterr().err


def test_export_never_writes_through_a_link_out_of_its_folder(tmp_path, capsys) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    export = tmp_path / "export"
    (export / "SMEdit").mkdir(parents=True)
    (export / "SMEdit" / "llama3-8b.yaml").symlink_to(outside / "stolen.yaml")  # dangling: a write would create it
    assert cli.main(["hparams", "--export", str(export)]) == 2
    assert "llama3-8b.yaml already exists (a symbolic link)" in capsys.readouterr().err
    assert list(outside.iterdir()) == [] and [p.name for p in (export / "SMEdit").iterdir()] == ["llama3-8b.yaml"]
    (export / "SMEdit" / "llama3-8b.yaml").unlink()
    (export / "SMEdit").rmdir()
    (export / "SMEdit").symlink_to(outside)  # a link on the way
    assert cli.main(["hparams", "--export", str(export)]) == 2
    assert "SMEdit is a symbolic link" in capsys.readouterr().err and list(outside.iterdir()) == []
    (export / "SMEdit").unlink()
    assert cli.main(["hparams", "--export", str(export)]) == 0
    assert (export / "SMEdit" / "llama3-8b.yaml").is_file() and list(outside.iterdir()) == []


# ============================================================================================
# 6. resume refuses other settings
# ============================================================================================

def _train_hp(**changes: Any):
    return smedit_hparams(**{"max_steps": 1, "val_interval": 1, **changes})


@pytest.fixture()
def records():
    return load_records(sample_path("zsre_sample"), "zsre", limit=8)


@pytest.mark.parametrize("change,field", [({"reg_coef": 0.05}, "reg_coef"), ({"n_edits": 4}, "n_edits"),
                                          ({"seed": 3}, "seed"), ({"lr": 2e-3}, "lr"), ("data", "data_sha256")],
                         ids=["reg_coef", "n_edits", "seed", "lr", "data"])
def test_resume_with_other_settings_is_refused_listing_the_field(model, tok, tmp_path, records, change,
                                                                 field) -> None:
    out = tmp_path / "out"
    train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    before = tree(out)
    hp = _train_hp(max_steps=2, **(change if isinstance(change, dict) else {}))
    data = records[::-1] if change == "data" else records
    with pytest.raises(ValueError, match=rf"other settings(.|\n)*- {field}: archive .*, now (.|\n)*"
                                         "--continue-with-new-settings"):
        train_hypernet(model, tok, hp, data, out, progress=False)
    assert tree(out) == before


def test_resume_with_new_settings_when_asked_records_both(model, tok, tmp_path, records) -> None:
    out = tmp_path / "out"
    train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    with pytest.warns(UserWarning, match="continuing an archive trained with other settings .reg_coef"):
        result = train_hypernet(model, tok, _train_hp(max_steps=2, reg_coef=0.05), records, out, progress=False,
                                continue_with_new_settings=True)
    assert result.state.units_done == 2 and result.edits_seen == 2
    meta = read_meta(out)
    assert meta["training_fingerprint"]["reg_coef"] == 0.05
    (earlier,) = meta["fingerprint_history"]
    assert earlier["training_fingerprint"]["reg_coef"] == 0.5 and earlier["units_done"] == 1
    assert earlier["differences"] == ["reg_coef: archive 0.5, now 0.05"]


def test_resume_that_only_trains_longer_is_accepted(model, tok, tmp_path, records) -> None:
    out = tmp_path / "out"
    train_hypernet(model, tok, _train_hp(), records, out, progress=False)
    result = train_hypernet(model, tok, _train_hp(max_steps=2, chunk_size=5, val_n_edits=3), records, out,
                            progress=False)
    assert result.state.units_done == 2 and read_meta(out)["fingerprint_history"] == []


def test_smedit_train_refuses_to_resume_with_other_data_before_the_model_loads(model, tok, tmp_path, records,
                                                                              records_file, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    hparams = tiny_train_yaml(tmp_path, "tiny-smollm2", val_interval=1)
    hp = load_hparams(hparams)
    train_hypernet(model, tok, hp, load_records(records_file, "zsre")[::-1], out, progress=False)
    no_model_load(monkeypatch)
    assert cli.main(["train", str(hparams), "--data", str(records_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data_sha256: archive" in err and "--continue-with-new-settings" in err


# ============================================================================================
# 8. integrity
# ============================================================================================

def test_a_manifest_listing_no_files_is_damage(model, tmp_path) -> None:
    path = save_archive(tmp_path / "arch", seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")
    weights = published(path) / "hypernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # bit-rot that the checksums would catch
    weights.write_bytes(bytes(data))
    manifest = json.loads((path / fileio.MANIFEST).read_text())
    (path / fileio.MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(ArchiveError, match="lists no files"):
        load_archive(path, model, smedit_hparams())


def test_a_file_the_manifest_does_not_list_is_refused(model, tmp_path) -> None:
    path = save_archive(tmp_path / "arch", seeded_editor(model, smedit_hparams(), 1), model_name="tiny-smollm2")
    manifest = json.loads((path / fileio.MANIFEST).read_text())
    manifest["files"].pop("meta.json")
    (path / fileio.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArchiveError, match="does not list meta.json"):
        load_archive(path, model, smedit_hparams())
    manifest["files"] = json.loads((path / fileio.MANIFEST).read_text())["files"]
    save_file({"x": torch.zeros(1)}, str(published(path) / "optimizer.safetensors"))  # dropped in, never checked
    (path / fileio.MANIFEST).write_text(json.dumps({**manifest, "files": {
        **manifest["files"], "meta.json": json.loads((published(path) / fileio.VERSION_RECORD).read_text())["files"][
            "meta.json"]}}))
    with pytest.raises(ArchiveError, match="holds optimizer.safetensors, which .* does not list"):
        load_archive(path, model, smedit_hparams())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_state_converted_to_another_dtype_and_re_signed_is_refused(edited, tiny4, tmp_path, dtype) -> None:
    folder = save_hook_state(edited, tmp_path / "state")

    def convert(tensors):
        for name in list(tensors):
            if name.endswith(("delta_w", "alpha")):
                tensors[name] = tensors[name].to(dtype)

    resign(folder, STATE_TENSORS, edit_tensors(convert))
    resign(folder, STATE_JSON, lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "shapes": {
        k: [str(dtype).removeprefix("torch.") if k.endswith(("delta_w", "alpha")) else v[0], v[1]]
        for k, v in json.loads(f.read_text())["shapes"].items()}})))
    fresh = copy.deepcopy(tiny4[0])
    before = params_of(fresh)
    with pytest.raises(StateError, match=f"delta_w is {dtype} but a state saved from this model holds torch.float32"):
        load_hook_state(fresh, folder)
    assert_untouched(fresh, before)


@pytest.mark.parametrize("name,value,needle", [("lr.weight", 1e30, "learned edit rate"),
                                               ("lr.weight", -1.0, "learned edit rate"),
                                               ("lamda.weight", 80.0, "learned ridge exponent"),
                                               ("normaliser.std", -1.0, "is negative")])
def test_archive_values_training_cannot_produce_are_refused(model, tok, tmp_path, name, value, needle) -> None:
    hp = smedit_hparams()
    path = save_archive(tmp_path / "arch", seeded_editor(model, hp, 1), model_name="tiny-smollm2")
    resign(path, "hypernet.safetensors", edit_tensors(lambda t: [t[k].fill_(value) for k in t if k.endswith(name)]))
    before = params_of(model)
    with pytest.raises(ArchiveError, match=needle):
        apply_smedit_to_model(model, tok, [{"prompt": "The capital of France is", "target_new": "Rome"}],
                              hp.replace(archive=str(path)))
    assert_untouched(model, before)


def test_a_state_whose_edited_weights_overflow_the_model_dtype_is_refused(tiny4, tmp_path) -> None:
    """delta_w is a float32 master; in a float16 model ``W + delta_w`` must still fit float16 (65504)."""
    half = copy.deepcopy(tiny4[0]).half()
    base = copy.deepcopy(half)
    apply_comeba_hk_to_model(half, tiny4[1], REQUESTS, comeba_hparams())
    folder = save_hook_state(half, tmp_path / "state")
    resign(folder, STATE_TENSORS, edit_tensors(  # finite in float32, not once added to the float16 weight
        lambda t: [t[k].fill_(1e5) for k in t if k.endswith("delta_w") and "layers.2" in k]))
    before = params_of(base)
    with pytest.raises(StateError, match="the edited weight of model.layers.2.mlp.down_proj would overflow the "
                                         "model's torch.float16"):
        load_hook_state(base, folder)
    assert_untouched(base, before)


def test_shipped_name_lookups_never_leave_their_folder(tmp_path, monkeypatch) -> None:
    hp_dir = tmp_path / "hparams"
    (hp_dir / "SMEdit").mkdir(parents=True)
    good = yaml.safe_dump(smedit_hparams().to_dict())
    (hp_dir / "SMEdit" / "tiny.yaml").write_text(good)
    (tmp_path / "x.yaml").write_text(good)  # outside the hparams folder: $SMEDIT_HPARAMS_DIR/../x.yaml
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SMEDIT_HPARAMS_DIR", str(hp_dir))
    assert load_hparams("SMEdit/tiny").alg_name == "SMEdit"
    for name in ("../x", "SMEdit/../../x", "./../x"):
        with pytest.raises(HyperParamsError, match="does not exist"):
            load_hparams(name)
    from smedit_plugin.shipped import shipped_hparams_path

    with pytest.raises(FileNotFoundError, match="never leaves that folder"):
        shipped_hparams_path("SMEdit/../../x")


BAD_TARGETS = [("<|endoftext|>", "special token '<|endoftext|>'"), ("Paris<|im_end|>", "special token '<|im_end|>'"),
               ("\u200b", "invisible character U\\+200B"), ("Par\u200bis", "invisible character U\\+200B"),
               ("\ufeffRome", "invisible character U\\+FEFF")]


@pytest.mark.parametrize("target,needle", BAD_TARGETS, ids=["eot", "im_end", "zwsp-only", "zwsp-inside", "bom"])
def test_special_token_and_invisible_targets_are_refused(model, tok, tmp_path, target, needle) -> None:
    hp = smedit_hparams()
    path = save_archive(tmp_path / "arch", seeded_editor(model, hp, 1), model_name="tiny-smollm2")
    before = params_of(model)
    with pytest.raises(ValueError, match=needle):
        apply_smedit_to_model(model, tok, [{"prompt": "The capital of France is", "target_new": target}],
                              hp.replace(archive=str(path)))
    with pytest.raises(ValueError, match=needle):
        apply_comeba_hk_to_model(model, tok, [{**REQUESTS[0], "target_new": target}], comeba_hparams())
    assert_untouched(model, before)


def test_visible_text_with_joiners_is_accepted_as_a_target(tok) -> None:
    from smedit_plugin.request_checks import check_targets

    check_targets(tok, ["Rome", "Paris, France", "\U0001F469\u200d\U0001F52C", "naïve café"])
    with pytest.raises(ValueError, match="no visible character"):
        check_targets(tok, ["\u200d "])


def test_a_comeba_hk_prompt_with_two_placeholders_is_refused(model, tok) -> None:
    before = params_of(model)
    with pytest.raises(ValueError, match="has 2 '{}' placeholders"):
        apply_comeba_hk_to_model(model, tok, [{"prompt": "The capital of France is {} {}", "subject": "France",
                                               "target_new": "Rome"}], comeba_hparams())
    assert_untouched(model, before)


def test_numeric_strings_for_int_fields_are_coerced_as_documented(tmp_path) -> None:
    """docs/guarantees.md: a quoted whole number is read as that int; anything else is refused naming the field."""
    base = smedit_hparams().to_dict()
    for text, expected in (('"8"', 8), ('"8.0"', 8), ("8.0", 8)):
        (tmp_path / "hp.yaml").write_text(yaml.safe_dump({**base, "n_edits": 0}).replace("n_edits: 0", f"n_edits: {text}"))
        assert load_hparams(tmp_path / "hp.yaml").n_edits == expected
    for text in ('"8.5"', '"eight"', "8.5", "true"):
        (tmp_path / "hp.yaml").write_text(yaml.safe_dump({**base, "n_edits": 0}).replace("n_edits: 0", f"n_edits: {text}"))
        with pytest.raises(HyperParamsError, match="field 'n_edits' must be int"):
            load_hparams(tmp_path / "hp.yaml")
