"""Shared fixtures: a tiny SynthFER (generated once per session) and a tiny recipe factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(2)

TINY_SYNTH = dict(seed=3, size=32, n_train=96, n_val=32, n_test=48)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory) -> Path:
    """Prepared caches (data.cache: auto) go to a session folder, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("fer_bench_cache")
    os.environ["FER_BENCH_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_synthfer(tmp_path_factory) -> Path:
    from fer_bench.data import SynthFERConfig, generate_synthfer

    root = tmp_path_factory.mktemp("synth") / "synthfer"
    generate_synthfer(out=root, config=SynthFERConfig(**TINY_SYNTH), workers=1)
    return root


def tiny_recipe_dict(root: Path, out: Path, **overrides) -> dict:
    """A recipe that trains a 2-block ViT on 32-px SynthFER in a few seconds."""
    recipe = {
        "name": "tiny",
        "data": {"dataset": "synthfer", "root": str(root), "img_size": 32},
        "model": {
            "backbone": "vit_tiny_patch16_224",
            "backbone_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        },
        "optim": {"lr": 1e-3, "epochs": 2, "batch_size": 16, "warmup_epochs": 0.5},
        "runtime": {"precision": "fp32", "seed": 0},
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "tests"},
        "output_dir": str(out / "run"),
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        recipe[section][field] = value
    return recipe


class Recorder:
    """Training callbacks that keep the messages (``fit(..., callbacks=Recorder())``)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)

    def start_epoch(self, *args) -> None:
        pass

    def step(self, loss) -> None:
        pass

    def end_epoch(self, row) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Released face-detector weights and reference implementations, fetched with the ordinary package client.

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / ".weights"
REFERENCE_WHEELS = {"facenet-pytorch": "2.6.0", "retinaface-pytorch": "0.0.8"}


def reference_wheel(package: str) -> Path:
    """The wheel of ``package`` (pinned in REFERENCE_WHEELS) in the repository's ignored ``.weights/`` folder,
    fetched with ``pip download --no-deps`` the first time (the package index is reachable in CI; nothing is
    installed, so no torch pin of theirs applies). facenet-pytorch's wheel carries the MTCNN weights (MIT)."""
    import subprocess
    import sys

    version = REFERENCE_WHEELS[package]
    stem = package.replace("-", "_") + f"-{version}-"
    found = sorted(WEIGHTS_DIR.glob(stem + "*.whl"))
    if not found:
        WEIGHTS_DIR.mkdir(exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "--disable-pip-version-check",
                f"{package}=={version}",
                "-d",
                str(WEIGHTS_DIR),
            ],
            check=True,
            timeout=300,
        )
        found = sorted(WEIGHTS_DIR.glob(stem + "*.whl"))
    assert found, f"pip download {package}=={version} left no wheel in {WEIGHTS_DIR}"
    return found[0]


def import_from_wheel(wheel: Path, extract_to: Path) -> Path:
    """Unpack ``wheel`` into ``extract_to`` (once) and put it first on sys.path; returns the folder."""
    import sys
    import zipfile

    marker = extract_to / ".unpacked"
    if not marker.exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(extract_to)
        marker.touch()
    if str(extract_to) not in sys.path:
        sys.path.insert(0, str(extract_to))
    return extract_to


@pytest.fixture(scope="session")
def mtcnn_wheel() -> Path:
    return reference_wheel("facenet-pytorch")


@pytest.fixture(scope="session")
def retinaface_reference(tmp_path_factory) -> Path:
    """retinaface-pytorch 0.0.8's code (not installed: it pins torch 1.9), importable as ``retinaface``."""
    return import_from_wheel(reference_wheel("retinaface-pytorch"), tmp_path_factory.mktemp("retinaface_ref"))
