"""Helpers every adapter uses: line reading with file:line errors, layout errors, class folders, the manifest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fer_bench._io import is_utf8_name, shown_path
from fer_bench.data.labels import LabelSpace, canonical_expression
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

#: Split folder spellings of community re-packagings → fer_bench split names.
SPLIT_FOLDERS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def line_error(path: Path, line: int, message: str) -> DataError:
    """``path:line: message`` as a DataError (the one format every malformed-line message uses)."""
    return DataError(f"{path}:{line}: {message}")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, stripped text) for the non-blank lines of a text file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.strip()


def no_layout_error(dataset: str, root: Path, looked_for: Mapping[str, str]) -> DataError:
    """The error for a root in none of an adapter's layouts, listing each layout and its marker."""
    tried = "; ".join(f"{name}: {marker}" for name, marker in looked_for.items())
    return DataError(f"--root {root}: no {dataset} layout found. Looked for {tried}")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def find_split_folders(root: Path) -> dict[str, Path]:
    """Sub-folders of ``root`` named like splits (train/val/test and common spellings), by split name."""
    found: dict[str, Path] = {}
    if root.is_dir():
        for child in sorted(root.iterdir()):
            split = SPLIT_FOLDERS.get(child.name.lower())
            if child.is_dir() and split and split not in found:
                found[split] = child
    return found


def class_folders(folder: Path, *, label_of: Callable[[str], str | None], dataset: str) -> list[tuple[Path, str]]:
    """The class sub-folders of ``folder`` as (path, class name); an unmappable folder name is an error."""
    out = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = label_of(child.name)
        if name is None:
            raise DataError(f"{child}: folder name {child.name!r} is not a {dataset} class (see the dataset card)")
        out.append((child, name))
    return out


def folder_rows(
    root: Path, folders: Mapping[str, Path], *, label_of: Callable[[str], str | None], dataset: str
) -> list[dict[str, Any]]:
    """One row per image in ``<split folder>/<class folder>/``; the class comes from ``label_of(folder name)``."""
    rows = []
    for split, split_dir in folders.items():
        for class_dir, name in class_folders(split_dir, label_of=label_of, dataset=dataset):
            for image in sorted(p for p in class_dir.rglob("*") if is_image(p)):
                if not is_utf8_name(image):
                    raise DataError(f"{shown_path(image)}: the file name is not valid UTF-8; rename the file")
                rel = image.relative_to(root).as_posix()
                rows.append(
                    {
                        "image_id": submission_id_for_path(rel),
                        "path": rel,
                        "split": split,
                        "expression": name,
                        "native_label": class_dir.name,
                    }
                )
    return rows


def submission_id_for_path(rel: str) -> str:
    """The image id of a file in a folder or CSV dataset: its path relative to the root, without the extension.

    Example:
        >>> submission_id_for_path("test/happy/img01.jpg")
        'test/happy/img01'
    """
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def name_label(text: str) -> str | None:
    """Class-name folder → canonical expression (synonyms, case-insensitive)."""
    return canonical_expression(text)


def make_info(
    *,
    name: str,
    root: Path,
    layout: str,
    label_space: LabelSpace,
    rows: list[dict[str, Any]],
    dropped: Counter | dict[str, int] | None = None,
    group_columns: tuple[str, ...] = (),
    subset_columns: tuple[str, ...] = (),
    splits: str = "",
    **fields: Any,
) -> DatasetInfo:
    """Build the DatasetInfo from row dicts that carry ``expression`` (a class name of ``label_space``).

    Rows whose expression is outside the label space (contempt under a 7-class protocol) are dropped and counted
    as ``"<expression> (not in <space>)"``.
    """
    dropped = Counter(dropped or {})
    kept = []
    for row in rows:
        if row["expression"] in label_space.names:
            kept.append(row)
        else:
            dropped[f"{row['expression']} (not in {label_space.name})"] += 1
    if not kept:
        raise DataError(f"--root {root}: the {layout} layout was found but no {name} image was read")
    manifest = pd.DataFrame(kept)
    manifest["label"] = manifest["expression"].map({n: i for i, n in enumerate(label_space.names)}).astype("int64")
    manifest["native_label"] = manifest["native_label"].astype(str)
    for column in group_columns:
        manifest[column] = manifest[column].fillna("unknown").astype(str) if column in manifest else "unknown"
    for column in subset_columns:
        manifest[column] = manifest[column].fillna(False).astype(bool) if column in manifest else False
    return DatasetInfo(
        name=name,
        root=root,
        layout=layout,
        label_space=label_space,
        manifest=manifest.reset_index(drop=True),
        group_columns=group_columns,
        subset_columns=subset_columns,
        dropped=dict(sorted(dropped.items())),
        splits=splits,
        **fields,
    )
