"""What a user gets from pip: the wheel carries every YAML and data file, shipped names resolve anywhere."""
from __future__ import annotations

import configparser
import json
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import setuptools

import smedit_plugin
from smedit_plugin.cli import main
from smedit_plugin.hparams import HyperParamsError, load_hparams
from smedit_plugin.shipped import export_hparams, shipped_names

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(p.relative_to(ROOT / "hparams").as_posix() for p in (ROOT / "hparams").rglob("*.yaml"))
DATA_FILES = sorted(p.relative_to(ROOT / "smedit_plugin").as_posix()
                    for p in (ROOT / "smedit_plugin" / "resources").rglob("*") if p.is_file())


def test_packages_are_found_not_listed() -> None:
    """A new method folder needs no packaging step: setup.cfg lists no package and setup.py finds them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "packages" not in config["options"]
    assert config["options"]["package_dir"].split() == ["smedit_plugin.hparams_files", "=", "hparams"]


def test_shipped_names_cover_the_hparams_folder() -> None:
    assert shipped_names() == sorted(y[: -len(".yaml")] for y in YAMLS)
    assert "SMEdit/llama3-8b" in shipped_names() and "TRAINING/MALMEN2/smollm2-135m" in shipped_names()


def test_load_hparams_by_shipped_name_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    hp = load_hparams("COMEBA-HK/gemma-2")
    assert hp.alg_name == "COMEBA-HK"
    assert load_hparams("TRAINING/SMEdit/smollm2-135m").n_edits == 64
    assert load_hparams("SMEdit/llama3-8b.yaml").alg_name == "SMEdit"
    with pytest.raises(HyperParamsError, match=r"did you mean SMEdit/llama3-8b"):
        load_hparams("SMEdit/llama3")


def test_a_file_path_wins_over_a_shipped_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "SMEdit" / "llama3-8b.yaml"
    local.parent.mkdir()
    text = (ROOT / "hparams" / "SMEdit" / "llama3-8b.yaml").read_text().replace("bp_steps: 2", "bp_steps: 3")
    assert "bp_steps: 3" in text
    local.write_text(text)
    assert load_hparams("SMEdit/llama3-8b").bp_steps == 3
    assert load_hparams(str(ROOT / "hparams" / "SMEdit" / "llama3-8b.yaml")).bp_steps == 2


def test_export_writes_easyedit_layout_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    assert main(["hparams", "--export", str(tmp_path / "out")]) == 0
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == YAMLS
    assert (tmp_path / "out" / "TRAINING" / "SMEdit" / "smollm2-135m.yaml").read_bytes() == \
        (ROOT / "hparams" / "TRAINING" / "SMEdit" / "smollm2-135m.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_hparams(tmp_path / "out")
    assert main(["hparams", "--export", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["hparams"]) == 0
    assert "COMEBA-HK/llama3-8b" in capsys.readouterr().out.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)], check=True)
    (path,) = out.glob("smedit_plugin-*.whl")
    return path


def test_the_wheel_carries_every_yaml_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [y for y in YAMLS if f"smedit_plugin/hparams_files/{y}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    missing = [d for d in DATA_FILES if f"smedit_plugin/{d}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("tests/", "hparams/", "benchmarks/")) for n in names)
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "smedit_plugin").rglob("*.py"))
    assert [m for m in modules if m not in names] == [], "a module of the source tree is missing from the wheel"


@pytest.mark.slow
def test_a_wheel_install_works_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """A venv that sees this interpreter's dependencies but gets smedit_plugin only from the wheel."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies (torch, transformers, ...) come from this interpreter, after the venv's own packages
    (Path(purelib) / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SMEDIT_HPARAMS_DIR")}
    run = lambda *args: subprocess.run([str(python), *args], cwd=work, env=env, check=True, capture_output=True,
                                       text=True).stdout
    code = ("import json, smedit_plugin as s; from smedit_plugin.general import default_glue_dir; "
            "from smedit_plugin.shipped import WIKITEXT2_TEST; "
            "hp = s.load_hparams('COMEBA-HK/gemma-2'); "
            "print(json.dumps([s.__file__, hp.alg_name, str(default_glue_dir()), str(WIKITEXT2_TEST)]))")
    location, alg_name, glue, text = json.loads(run("-c", code))
    assert Path(location).is_relative_to(env_dir) and not Path(location).is_relative_to(ROOT)
    assert alg_name == "COMEBA-HK"
    assert Path(glue).is_relative_to(env_dir) and (Path(glue) / "mmlu.json").is_file()
    assert Path(text).is_relative_to(env_dir) and Path(text).stat().st_size > 10**6
    run("-m", "smedit_plugin.cli", "hparams", "--export", "out")
    assert sorted(p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*.yaml")) == YAMLS
    assert "smedit-plugin" in run("-m", "smedit_plugin.cli", "info")
    assert Path(smedit_plugin.__file__).is_relative_to(ROOT)  # this process still tests the checkout
