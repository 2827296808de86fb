"""A real package: the wheel built from the repository carries the dataset cards, the recipes and the leaderboards,
and its ``ferbench``, run from a folder outside the repository, describes a dataset against its card, trains the
quickstart recipe by name and submits to a boards folder of the user's own. An editable install finds the same
folders at the top of the repository.

The wheel goes into a fresh virtual environment that sees this environment's site-packages through a ``.pth`` path
line (torch and the rest are not installed again; a path line does not run the ``.pth`` files of that folder, so
the editable install of fer_bench there stays out of it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from fer_bench.eval import get_protocol, load_protocol_data, protocol_rows
from tests import formats

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("datasets", "recipes", "leaderboards")


def _source_copy(dest: Path) -> Path:
    """What the build reads, copied (the build leaves build/ and *.egg-info beside the sources)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("fer_bench", *SHIPPED):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _venv(path: Path) -> Path:
    """A virtual environment without pip whose sys.path ends with this environment's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = Path(sysconfig.get_paths()["purelib"]).resolve()
    (Path(purelib) / "_fer_bench_test_parent.pth").write_text(f"{ours}\n")
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"COLUMNS": "200", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}


def _pip_install(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", *args],
        check=True,
        timeout=300,
        env=_env(),
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = _source_copy(work / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
        + ["--disable-pip-version-check", "-w", str(work / "dist")],
        check=True,
        timeout=300,
        env=_env(),
    )
    (built,) = (work / "dist").glob("fer_bench-*.whl")
    return built


def test_the_wheel_carries_the_code_and_the_shipped_folders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "fer_bench").rglob("*.py")}
    assert code <= names, sorted(code - names)  # every package of fer_bench/ is listed in pyproject.toml
    for folder in SHIPPED:
        files = {f"fer_bench/_shipped/{folder}/{p.name}" for p in (REPO / folder).iterdir() if p.is_file()}
        assert files and files <= names, sorted(files - names)


def test_the_installed_wheel_works_outside_the_repository(wheel, tmp_path, tiny_synthfer):
    python = _venv(tmp_path / "venv")
    _pip_install(python, str(wheel))
    ferbench = tmp_path / "venv" / "bin" / "ferbench"
    work = tmp_path / "work"  # the current folder: no recipes/, datasets/ or leaderboards/ here
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(ferbench), *args], cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    probe = (
        "import fer_bench, fer_bench.shipped as s\n"
        "print(fer_bench.__file__)\n"
        "print(*(s.shipped_dir(k) for k in s.KINDS))\n"
        "print(s.is_inside_package(s.shipped_dir('leaderboards')))\n"
    )
    out = subprocess.run(
        [str(python), "-c", probe], cwd=work, env=_env(), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    site = (tmp_path / "venv" / "lib").resolve()
    package = Path(out[0]).resolve().parent
    assert package.is_relative_to(site), out[0]  # the wheel's copy, not the repository's
    assert [Path(p) for p in out[1].split()] == [package / "_shipped" / k for k in SHIPPED]
    assert out[2] == "True"  # so leaderboard submit refuses to write there (boards_to_write)
    shipped_boards = {p.name: p.read_bytes() for p in (package / "_shipped" / "leaderboards").iterdir()}

    listed = run("recipes").stdout
    assert "quickstart" in listed and "rafdb_vit_b16" in listed and "SynthFER" in listed

    # (a) the dataset card is found: the counts of a small official-layout RAF-DB differ from the card's
    raf = formats.write_rafdb_official(tmp_path / "raf")
    described = run("data", "describe", "--dataset", "rafdb", "--root", str(raf))
    assert "train: found 14 images, expected 12,271" in described.stderr

    # (b) the quickstart recipe by name, two steps at 32 px
    small = {
        "data.root": tiny_synthfer,
        "data.img_size": 32,
        "model.backbone_kwargs.depth": 1,
        "optim.epochs": 1,
        "optim.batch_size": 16,
        "runtime.max_steps": 2,
        "runtime.precision": "fp32",
        "tracking.enabled": "false",
        "output_dir": tmp_path / "run",
    }
    run("train", "quickstart", *(x for k, v in small.items() for x in ("--set", f"{k}={v}")))
    assert (tmp_path / "run" / "best.pt").is_file()

    # (c) a submission goes to a boards folder of the user's own, seeded from the shipped board
    protocol = get_protocol("synthfer")
    ids = protocol_rows(protocol, load_protocol_data(protocol, tiny_synthfer, {}))["image_id"].astype(str)
    sub = tmp_path / "sub.csv"
    sub.write_text("image_id,prediction\n" + "".join(f"{i},happiness\n" for i in ids))
    meta = tmp_path / "meta.yaml"
    meta.write_text(yaml.safe_dump({"model": "wheel-test", "backbone": "none", "pretrain": "none"}))
    boards = tmp_path / "boards"
    common = ("--dataset", "synthfer", "--root", str(tiny_synthfer), "--meta", str(meta), "--bootstrap", "20")
    run("leaderboard", "submit", str(sub), *common, "--boards", str(boards))
    assert "wheel-test" in (boards / "synthfer.csv").read_text() and (boards / "synthfer.md").is_file()
    assert "[synthfer](synthfer.md) | 1 |" in (boards / "README.md").read_text()  # the shipped README, its index
    assert "wheel-test" in run("leaderboard", "show", "synthfer", "--boards", str(boards)).stdout
    assert {p.name: p.read_bytes() for p in (package / "_shipped" / "leaderboards").iterdir()} == shipped_boards


def test_an_editable_install_finds_the_top_level_folders(tmp_path):
    source = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _pip_install(python, "--no-build-isolation", "-e", str(source))
    probe = (
        "import fer_bench, fer_bench.shipped as s\n"
        "from fer_bench.data import load_card\n"
        "print(fer_bench.__file__)\n"
        "print(*(s.shipped_dir(k) for k in s.KINDS))\n"
        "print(load_card('rafdb') is not None)\n"
    )
    out = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert Path(out[0]) == source / "fer_bench" / "__init__.py"
    assert [Path(p) for p in out[1].split()] == [source / k for k in SHIPPED]
    assert out[2] == "True"
