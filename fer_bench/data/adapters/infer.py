"""InFER (Rizvi et al., ICAART 2023): Indian facial expressions, 7 classes, age / gender / ethnicity labels.

The public release format of InFER is not known to fer_bench, so this adapter reads the generic form it is most
likely to take, and says so in ``describe``:

* images in class-name folders, ``[images/][<split>/]<class name>/*`` (synonyms accepted);
* an optional ``metadata.csv`` with case-insensitive columns: file (or path, filename, image), label (or expression,
  emotion), subject_id (or subject), age, gender, ethnicity (or race, region), source, fold. It can also stand alone
  (file + label) without class folders.

The paper evaluates by 10-fold cross-validation without published folds. Unless ``metadata.csv`` has a fold column,
fer_bench builds 10 stratified folds with a fixed seed, grouped by subject when subjects are known, and labels every
result "InFER 10-fold (fer_bench folds)" so nobody mistakes it for the paper's numbers. ``fold`` k is the test split;
the other nine train (a recipe carves its val split from them).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fer_bench.data._registry import register_dataset
from fer_bench.data.adapters._common import (
    find_split_folders,
    folder_rows,
    line_error,
    make_info,
    name_label,
    no_layout_error,
    submission_id_for_path,
)
from fer_bench.data.labels import get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import ConfigError, DataError
from fer_bench.options import check_choice

N_FOLDS = 10
FOLD_SEED = 0
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "file": ("file", "path", "filename", "image", "file_name"),
    "label": ("label", "expression", "emotion", "class"),
    "subject_id": ("subject_id", "subject", "subject id", "person", "person_id"),
    "age": ("age", "age_group"),
    "gender": ("gender", "sex"),
    "ethnicity": ("ethnicity", "race", "region"),
    "source": ("source",),
    "fold": ("fold",),
}
GROUP_COLUMNS = ("age", "gender", "ethnicity", "source")


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """``metadata.csv`` rows with canonical column names (see COLUMN_ALIASES); ``_line`` holds the file line."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        columns: dict[str, int] = {}
        for key, aliases in COLUMN_ALIASES.items():
            for i, name in enumerate(header):
                if name in aliases and key not in columns:
                    columns[key] = i
        if "file" not in columns:
            raise line_error(path, 1, f"no file column (one of {list(COLUMN_ALIASES['file'])}) in header {header}")
        rows = []
        for number, record in enumerate(reader, start=2):
            if not record or not any(v.strip() for v in record):
                continue
            if len(record) != len(header):
                raise line_error(path, number, f"expected {len(header)} fields, found {len(record)}")
            rows.append({"_line": number, **{key: record[i].strip() for key, i in columns.items()}})
    return rows


def generated_folds(labels: np.ndarray, groups: np.ndarray | None, *, n_folds: int = N_FOLDS) -> np.ndarray:
    """Fold index per row: stratified by label and, with ``groups``, no subject in two folds (fixed seed)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if len(labels) < n_folds:
        raise DataError(f"InFER: {len(labels)} images cannot be split into {n_folds} folds")
    folds = np.full(len(labels), -1, dtype=np.int64)
    x = np.zeros(len(labels))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=FOLD_SEED)
        parts = splitter.split(x, labels, groups)
    else:
        parts = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=FOLD_SEED).split(x, labels)
    for fold, (_, test) in enumerate(parts):
        folds[test] = fold
    return folds


@register_dataset("infer")
def load_infer(root: Path, *, fold: int = 0, protocol: str | None = None) -> DatasetInfo:
    """InFER, 7 classes: 10-fold CV (``fold`` = test fold) or, with ``protocol=folders``, its split folders."""
    image_root = root / "images" if (root / "images").is_dir() else root
    meta_path = root / "metadata.csv"
    metadata = read_metadata(meta_path) if meta_path.is_file() else []
    splits = find_split_folders(image_root)
    class_dirs = [p for p in (splits.values() if splits else [image_root]) if p.is_dir()]
    has_folders = any(name_label(c.name) for d in class_dirs for c in d.iterdir() if c.is_dir())
    notes: list[str] = []
    if has_folders:
        folders = splits or {"train": image_root}
        rows = folder_rows(root, folders, label_of=name_label, dataset="InFER")
        layout = "class-name folders" + (" under split folders" if splits else "")
    elif metadata:
        rows = []
        for record in metadata:
            if "label" not in record:
                raise line_error(meta_path, 1, "without class folders metadata.csv needs a label column")
            expression = name_label(record["label"])
            if expression is None:
                raise line_error(meta_path, record["_line"], f"label {record['label']!r} is not an expression name")
            rel = (image_root / record["file"]).relative_to(root).as_posix()
            rows.append(
                {
                    "image_id": submission_id_for_path(rel),
                    "path": rel,
                    "split": "train",
                    "expression": expression,
                    "native_label": record["label"],
                }
            )
        layout = "metadata.csv (file, label)"
    else:
        raise no_layout_error(
            "InFER",
            root,
            {"folders": "[images/][<split>/]<class name>/", "metadata": "metadata.csv with file and label columns"},
        )
    if metadata:
        by_path = {(image_root / r["file"]).relative_to(root).as_posix(): r for r in metadata}
        by_name: dict[str, list[dict]] = {}
        for r in metadata:
            by_name.setdefault(Path(r["file"]).name, []).append(r)
        unmatched = 0
        for row in rows:
            record = by_path.get(row["path"]) or (lambda m: m[0] if len(m) == 1 else None)(
                by_name.get(Path(row["path"]).name, [])
            )
            if record is None:
                unmatched += 1
                continue
            label = record.get("label")
            if label and name_label(label) not in (None, row["expression"]):
                raise line_error(
                    meta_path,
                    record["_line"],
                    f"label {label!r} disagrees with the folder {row['native_label']!r} of {row['path']}",
                )
            row |= {k: record[k] for k in ("subject_id", *GROUP_COLUMNS, "fold") if record.get(k)}
        layout += " + metadata.csv"
        if unmatched:
            notes.append(f"{unmatched} images have no metadata.csv row (groups 'unknown')")
    if protocol is None:
        protocol = "folders" if splits and "test" in splits else "cv10"
    check_choice("protocol", protocol, ("cv10", "folders"))
    if protocol == "folders":
        if not splits or "test" not in splits:
            raise ConfigError(f"option protocol=folders: no test/ split folder under {image_root}")
        description = "InFER split folders (not the paper's protocol)"
    else:
        check_choice("fold", fold, range(N_FOLDS))
        given = [row.get("fold") for row in rows]
        if all(f not in (None, "") for f in given):
            try:
                folds = np.array([int(f) for f in given])
            except ValueError:
                raise DataError(f"{meta_path}: fold values must be integers 0..{N_FOLDS - 1}") from None
            description = f"InFER 10-fold (metadata.csv folds), test fold {fold}"
        else:
            labels = np.array([row["expression"] for row in rows])
            subjects = [row.get("subject_id") for row in rows]
            groups = np.array(subjects) if all(subjects) else None
            folds = generated_folds(labels, groups)
            grouped = "grouped by subject" if groups is not None else "not subject-grouped (no subject ids)"
            description = f"InFER 10-fold (fer_bench folds), test fold {fold}; stratified, {grouped}, seed {FOLD_SEED}"
            notes.append(f"folds generated by fer_bench ({grouped}); results are not comparable to the paper's folds")
        for row, f in zip(rows, folds, strict=True):
            row["fold"] = int(f)
            row["split"] = "test" if f == fold else "train"
    counts = Counter(r["split"] for r in rows)
    if not counts.get("test"):
        raise DataError(f"InFER at {root}: fold {fold} is empty")
    return make_info(
        name="infer",
        root=root,
        layout=layout,
        label_space=get_label_space("basic7"),
        rows=rows,
        group_columns=GROUP_COLUMNS,
        splits=description,
        notes=notes,
        extras={"resolved_options": {"protocol": protocol}},  # the split scheme chosen when none was asked for
    )
