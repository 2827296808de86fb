"""Custom data: ``folder`` (class-name folders) and ``csv`` (a table of path, label and any group columns).

Class names are matched case-insensitively against the synonym table (angry/anger, happy/happiness, sad/sadness,
surprised/surprise, fearful/afraid/fear, disgusted/disgust, neutral, contempt); the label space is ``all8`` when a
contempt class is present and ``basic7`` otherwise, unless ``label_space`` says which.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fer_bench.data._registry import register_dataset
from fer_bench.data.adapters._common import (
    SPLIT_FOLDERS,
    find_split_folders,
    folder_rows,
    line_error,
    make_info,
    name_label,
    no_layout_error,
    submission_id_for_path,
)
from fer_bench.data.labels import EXPRESSION_SYNONYMS, get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import ConfigError, DataError
from fer_bench.options import check_choice


def _space(label_space: str | None, rows: list[dict[str, Any]]):
    if label_space is None:
        label_space = "all8" if any(r["expression"] == "contempt" for r in rows) else "basic7"
    check_choice("label_space", label_space, ("basic7", "all8"))
    return get_label_space(label_space)


def _names(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


@register_dataset("folder")
def load_folder(root: Path, *, label_space: str | None = None, split: str = "test") -> DatasetInfo:
    """``<root>/<split>/<class>/*`` or ``<root>/<class>/*`` (all rows in ``split``, default test)."""
    check_choice("split", split, ("train", "val", "test"))
    splits = find_split_folders(root)
    if splits:
        rows = folder_rows(root, splits, label_of=name_label, dataset="folder dataset")
        layout = "class-name folders under split folders"
    else:
        if not any(p.is_dir() for p in root.iterdir()):
            raise no_layout_error("folder", root, {"folders": "<split>/<class>/ or <class>/ sub-folders"})
        rows = folder_rows(root, {split: root}, label_of=name_label, dataset="folder dataset")
        layout = f"class-name folders (all images in split {split!r})"
    return make_info(
        name="folder",
        root=root,
        layout=layout,
        label_space=_space(label_space, rows),
        rows=rows,
        splits="custom folders",
    )


@register_dataset("csv")
def load_csv(
    root: Path,
    *,
    file: str = "labels.csv",
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    split: str = "test",
    group_columns: str | list[str] | None = None,
    subset_columns: str | list[str] | None = None,
    label_space: str | None = None,
) -> DatasetInfo:
    """A CSV (with a header) of image paths relative to ``root``, expression names and any group columns.

    Rows without a ``split_column`` value (or a table without that column) go to ``split``.
    """
    check_choice("split", split, ("train", "val", "test"))
    table = Path(file) if Path(file).is_absolute() else root / file
    if not table.is_file():
        raise DataError(f"option file: {table} not found (a CSV with columns {path_column}, {label_column}, ...)")
    groups, subsets = _names(group_columns), _names(subset_columns)
    rows: list[dict[str, Any]] = []
    with table.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        for column in (path_column, label_column, *groups, *subsets):
            if column not in header:
                raise ConfigError(f"{table}: column {column!r} not found; the header has {header}")
        for number, record in enumerate(reader, start=2):
            rel = (record.get(path_column) or "").strip()
            if not rel:
                raise line_error(table, number, f"empty {path_column!r}")
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise line_error(table, number, f"{path_column} {rel!r} must be a path inside the root")
            native = (record.get(label_column) or "").strip()
            expression = name_label(native)
            if expression is None:
                known = sorted({s for syns in EXPRESSION_SYNONYMS.values() for s in syns})
                raise line_error(table, number, f"label {native!r} is not an expression name (accepted: {known})")
            row_split = (record.get(split_column) or "").strip().lower() if split_column in header else ""
            row_split = SPLIT_FOLDERS.get(row_split, row_split) or split
            if row_split not in ("train", "val", "test"):
                raise line_error(table, number, f"split {row_split!r} is not train, val or test")
            row = {
                "image_id": submission_id_for_path(rel),
                "path": rel,
                "split": row_split,
                "expression": expression,
                "native_label": native,
            }
            row |= {c: (record.get(c) or "").strip() or "unknown" for c in groups}
            for column in subsets:
                value = (record.get(column) or "").strip().lower()
                if value not in ("", "0", "1", "true", "false", "yes", "no"):
                    raise line_error(table, number, f"subset column {column!r} must be true/false/1/0, got {value!r}")
                row[column] = value in ("1", "true", "yes")
            rows.append(row)
    if not rows:
        raise DataError(f"{table}: no data rows")
    return make_info(
        name="csv",
        root=root,
        layout=f"csv table ({table.name})",
        label_space=_space(label_space, rows),
        rows=rows,
        group_columns=groups,
        subset_columns=subsets,
        splits="custom csv",
    )
