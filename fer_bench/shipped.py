"""The folders fer_bench ships beside its code: dataset cards (``datasets/``), recipes (``recipes/``) and the
leaderboards (``leaderboards/``).

In the repository they stay at the top level. A wheel carries them inside the package as
``fer_bench/_shipped/<kind>/`` (pyproject.toml maps the packages ``fer_bench._shipped.<kind>`` to the top-level
folders), where :mod:`importlib.resources` finds them; in a source checkout or an editable install they are the
top-level folders beside the ``fer_bench`` package. Everything that reads them asks :func:`shipped_dir`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

ShippedKind = Literal["datasets", "recipes", "leaderboards"]
KINDS: tuple[str, ...] = ("datasets", "recipes", "leaderboards")


def _package_root() -> Path:
    root = importlib.resources.files("fer_bench")
    if not isinstance(root, Path):  # a zip import: the shipped folders are read as files, so they must be on disk
        raise RuntimeError(f"fer_bench is imported from {root}, not a folder; install it (pip install fer_bench)")
    return root


def packaged_dir(kind: ShippedKind) -> Path:
    """Where an installed wheel keeps ``kind`` (``fer_bench/_shipped/<kind>``); it may not exist (a checkout)."""
    if kind not in KINDS:
        raise ValueError(f"shipped folder {kind!r}: expected one of {list(KINDS)}")
    return _package_root() / "_shipped" / kind


def shipped_dir(kind: ShippedKind) -> Path:
    """The shipped ``kind`` folder: inside the installed package when it is there, else the repository's top-level
    folder (a source checkout or ``pip install -e .``). The path is returned even when neither exists (then it is
    the packaged one, and reading from it finds nothing)."""
    packaged = packaged_dir(kind)
    if packaged.is_dir():
        return packaged
    repository = _package_root().parent
    checkout = repository / kind
    return checkout if (repository / "pyproject.toml").is_file() and checkout.is_dir() else packaged


def is_inside_package(path: str | Path) -> bool:
    """True when ``path`` lies inside the installed ``fer_bench`` package (site-packages): never written to."""
    root = _package_root().resolve()
    return Path(path).resolve().is_relative_to(root)
