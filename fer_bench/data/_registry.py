"""The dataset registry: ``get_dataset(name, root, **options)`` → :class:`DatasetInfo`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fer_bench.data.manifest import DatasetInfo, validate_manifest
from fer_bench.errors import DataError
from fer_bench.options import check_keywords
from fer_bench.registry import Registry

DatasetLoader = Callable[..., DatasetInfo]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register a loader ``fn(root: Path, *, option=default, ...) -> DatasetInfo`` under ``name``.

    Options are keyword-only parameters, so ``get_dataset`` can reject unknown ones before reading anything.
    """
    return DATASETS.register(name)  # type: ignore[return-value]


def get_dataset(name: str, root: str | os.PathLike, **options) -> DatasetInfo:
    """Read dataset ``name`` from ``root`` and return its manifest and metadata.

    Raises:
        UnknownNameError: ``name`` is not registered (the message suggests close names).
        ConfigError: an option the adapter does not take, or a bad option value.
        DataError: ``root`` is missing or not in a layout the adapter knows, or a file in it is malformed.
    """
    loader = DATASETS.get(name)
    check_dataset_options(name, options)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--root {root}: folder does not exist")
    info = loader(root, **options)
    validate_manifest(info.manifest, num_classes=info.label_space.num_classes, source=f"{name} at {root}")
    return info


def check_dataset_options(name: str, options: dict[str, object]) -> None:
    """Raise UnknownNameError / ConfigError for an unknown dataset or an option its adapter does not take."""
    check_keywords(DATASETS.get(name), options, what=f"dataset {name!r}")


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, object]:
    """The options dataset ``name`` takes, with their defaults (for help texts and docs)."""
    import inspect

    params = inspect.signature(DATASETS.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
