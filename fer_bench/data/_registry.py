"""The dataset registry: ``get_dataset(name, root, **options)`` → :class:`DatasetInfo`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fer_bench.data.manifest import DatasetInfo, validate_manifest
from fer_bench.errors import DataError
from fer_bench.registry import Registry

DatasetLoader = Callable[..., DatasetInfo]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register a loader ``fn(root: Path, **options) -> DatasetInfo`` under ``name``."""
    return DATASETS.register(name)  # type: ignore[return-value]


def get_dataset(name: str, root: str | os.PathLike, **options) -> DatasetInfo:
    """Read dataset ``name`` from ``root`` and return its manifest and metadata.

    Raises:
        UnknownNameError: ``name`` is not registered (the message suggests close names).
        DataError: ``root`` is missing or not in a layout the adapter knows.
    """
    loader = DATASETS.get(name)
    root = Path(root)
    if not root.exists():
        raise DataError(f"--root {root}: folder does not exist")
    info = loader(root, **options)
    validate_manifest(info.manifest, num_classes=info.label_space.num_classes, source=f"{name} at {root}")
    return info


def list_datasets() -> list[str]:
    return DATASETS.names()
