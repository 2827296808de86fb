"""RAF-DB (Real-world Affective Faces Database): ``rafdb`` (basic, 7 classes) and ``rafdb-compound`` (11 classes).

Layouts read:

* ``official basic`` — ``EmoLabel/list_patition_label.txt`` (``<name>.jpg <label>``, labels 1..7 = surprise, fear,
  disgust, happiness, sadness, anger, neutral; split from the name prefix), ``Image/aligned/<stem>_aligned.jpg``
  (default) or ``Image/original/<name>``, ``Annotation/manual/<stem>_manu_attri.txt`` (5 landmark lines, then gender,
  race, age group), ``Annotation/auto/<stem>_auto_attri.txt`` (37 points) and
  ``Annotation/boundingbox/<stem>_boundingbox.txt`` when present. ``root`` may be the ``basic/`` folder or its parent.
* ``community numbered folders`` — ``[DATASET/]{train,test}/{1..7}/*.jpg`` (folder = RAF code), optionally with
  ``train_labels.csv``/``test_labels.csv`` at the root (used when the split folders hold the images directly).
* ``class-name folders`` — ``[DATASET/]{train,test}/<class name>/`` (angry, happy, ... synonyms accepted).

The RAN robustness lists (Wang et al., TIP 2020) become boolean test-row subsets ``occlusion``, ``pose30`` and
``pose45`` when given as options or found next to the data under their published names.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any

from fer_bench.data._registry import register_dataset
from fer_bench.data.adapters._common import (
    find_split_folders,
    folder_rows,
    line_error,
    make_info,
    name_label,
    no_layout_error,
    read_lines,
)
from fer_bench.data.labels import RAFDB_COMPOUND_CLASSES, get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import DataError
from fer_bench.options import check_choice

#: RAF-DB basic codes (file values 1..7) → canonical expression.
RAFDB_CODES: dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
COMPOUND_CODES: dict[int, str] = {i + 1: name for i, name in enumerate(RAFDB_COMPOUND_CLASSES)}

GENDER = {0: "male", 1: "female", 2: "unsure"}
RACE = {0: "caucasian", 1: "african_american", 2: "asian"}
AGE = {0: "0-3", 1: "4-19", 2: "20-39", 3: "40-69", 4: "70+"}
GROUP_COLUMNS = ("gender", "race", "age")
SUBSET_COLUMNS = ("occlusion", "pose30", "pose45")

#: RAN list files (kaiwang960112/Challenge-condition-FER-dataset, RAF_DB_dir/) → subset column.
RAN_LISTS = {
    "occlusion": "rafdb_occlusion_list.txt",
    "pose30": "val_raf_db_list.txt",
    "pose45": "val_raf_db_list_45.txt",
}

LABEL_FILE = Path("EmoLabel/list_patition_label.txt")
_STEM = re.compile(r"^(train|test)_(\d+)(?:_aligned)?$")


def raf_stem(filename: str) -> str:
    """``test_0001_aligned.jpg`` / ``test_0001.jpg`` / ``test_0001_aligned`` → ``test_0001``."""
    stem = Path(filename).name
    for suffix in (".jpg", ".jpeg", ".png"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.removesuffix("_aligned")


def _points(path: Path, lines: list[tuple[int, str]], count: int) -> list[float]:
    flat: list[float] = []
    for number, text in lines[:count]:
        fields = re.split(r"[\t ]+", text)
        try:
            x, y = (float(v) for v in fields[:2])
        except ValueError:
            raise line_error(path, number, f"expected two numbers 'x<TAB>y', got {text!r}") from None
        if len(fields) != 2:
            raise line_error(path, number, f"expected two numbers 'x<TAB>y', got {text!r}")
        flat += [x, y]
    return flat


def read_manual_attributes(path: Path) -> dict[str, Any]:
    """Parse ``*_manu_attri.txt``: 5 landmark lines (tab or space), then gender, race, age-group codes."""
    lines = list(read_lines(path))
    if len(lines) < 8:
        raise DataError(f"{path}: expected 8 lines (5 landmarks, gender, race, age), found {len(lines)}")
    out: dict[str, Any] = {"landmarks_original": _points(path, lines, 5)}
    for (number, text), column, codes in zip(lines[5:8], GROUP_COLUMNS, (GENDER, RACE, AGE), strict=True):
        try:
            out[column] = codes[int(text)]
        except (ValueError, KeyError):
            raise line_error(path, number, f"{column} code must be one of {sorted(codes)}, got {text!r}") from None
    return out


def _read_annotations(base: Path, stem: str, counts: Counter) -> dict[str, Any]:
    row: dict[str, Any] = {}
    manual = base / "Annotation" / "manual" / f"{stem}_manu_attri.txt"
    if manual.is_file():
        row |= read_manual_attributes(manual)
    else:
        counts["manual annotation missing"] += 1
    auto = base / "Annotation" / "auto" / f"{stem}_auto_attri.txt"
    if auto.is_file():
        lines = list(read_lines(auto))
        if len(lines) != 37:
            raise DataError(f"{auto}: expected 37 landmark lines, found {len(lines)}")
        row["auto_landmarks_original"] = _points(auto, lines, 37)
    box = base / "Annotation" / "boundingbox" / f"{stem}_boundingbox.txt"
    if box.is_file():
        (number, text), *_ = list(read_lines(box)) or [(1, "")]
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            values = []
        if len(values) != 4:
            raise line_error(box, number, f"expected 4 numbers 'x0 y0 x1 y1', got {text!r}")
        row["bbox_original"] = values
    return row


def _official_rows(
    root: Path, base: Path, *, codes: dict[int, str], images: str, dataset: str
) -> tuple[list[dict], Counter]:
    label_file = base / LABEL_FILE
    image_dir = base / "Image" / images
    if not image_dir.is_dir():
        other = "original" if images == "aligned" else "aligned"
        hint = f"; Image/{other} exists: pass --option images={other}" if (base / "Image" / other).is_dir() else ""
        raise DataError(f"{image_dir}: folder not found (option images={images}){hint}")
    rows, notes = [], Counter()
    for number, text in read_lines(label_file):
        fields = text.split()
        if len(fields) < 2:
            raise line_error(label_file, number, f"expected '<name>.jpg <label>', got {text!r}")
        name, code = fields[0], fields[-1]
        stem = raf_stem(name)
        match = _STEM.match(stem)
        if not match:
            raise line_error(label_file, number, f"image name {name!r} does not start with train_ or test_")
        try:
            expression = codes[int(code)]
        except (ValueError, KeyError):
            hint = " (labels 1..11 are the compound set: use --dataset rafdb-compound)" if code.isdigit() else ""
            raise line_error(
                label_file, number, f"label {code!r} is not a {dataset} code {min(codes)}..{max(codes)}{hint}"
            ) from None
        rel = f"Image/{images}/{stem}_aligned.jpg" if images == "aligned" else f"Image/{images}/{name}"
        row = {
            "image_id": stem,
            "path": (base / rel).relative_to(root).as_posix(),
            "split": match.group(1),
            "expression": expression,
            "native_label": code,
        }
        row |= _read_annotations(base, stem, notes)
        if images == "original":
            row["landmarks"] = row.get("landmarks_original")
            row["bbox"] = row.get("bbox_original")
        rows.append(row)
    return rows, notes


def _locate_official(root: Path, subfolder: str) -> Path | None:
    for base in (root, root / subfolder):
        if (base / LABEL_FILE).is_file():
            return base
    return None


def _numbered(name: str) -> str | None:
    return RAFDB_CODES.get(int(name)) if name.isdigit() else None


def _community_rows(root: Path) -> tuple[str, list[dict]] | None:
    for data_dir in (root / "DATASET", root):
        splits = {k: v for k, v in find_split_folders(data_dir).items() if k in ("train", "test")}
        if not splits:
            continue
        subdirs = [p.name for s in splits.values() for p in s.iterdir() if p.is_dir()]
        if subdirs and all(n.isdigit() for n in subdirs):
            rows = folder_rows(root, splits, label_of=_numbered, dataset="RAF-DB (folders 1..7)")
            return "community numbered folders DATASET/{train,test}/{1..7}", rows
        if subdirs:
            rows = folder_rows(root, splits, label_of=name_label, dataset="RAF-DB")
            return "class-name folders {train,test}/<class>", rows
        csv_rows = _community_csv_rows(root, splits)
        if csv_rows is not None:
            return "community flat folders with {train,test}_labels.csv", csv_rows
    return None


def _community_csv_rows(root: Path, splits: dict[str, Path]) -> list[dict] | None:
    rows = []
    for split, folder in splits.items():
        label_csv = root / f"{split}_labels.csv"
        if not label_csv.is_file():
            return None
        with label_csv.open(newline="", encoding="utf-8-sig") as handle:
            for number, record in enumerate(csv.reader(handle), start=1):
                if not record or (number == 1 and not record[-1].strip().isdigit()):
                    continue  # blank line or header
                if len(record) < 2:
                    raise line_error(label_csv, number, f"expected 'filename,label', got {record!r}")
                name, code = record[0].strip(), record[-1].strip()
                expression = _numbered(code)
                if expression is None:
                    raise line_error(label_csv, number, f"label {code!r} is not a RAF-DB code 1..7")
                rel = (folder / name).relative_to(root).as_posix()
                rows.append(
                    {"image_id": rel, "path": rel, "split": split, "expression": expression, "native_label": code}
                )
    return rows


def _ran_subsets(root: Path, rows: list[dict], lists: dict[str, str | None], notes: list[str]) -> None:
    by_stem = {raf_stem(r["image_id"]): r for r in rows if r["split"] == "test"}
    for column, option in lists.items():
        path = Path(option) if option else None
        if path is None:
            for candidate in (root / RAN_LISTS[column], root / "RAF_DB_dir" / RAN_LISTS[column]):
                path = candidate if candidate.is_file() else path
            if path is None:
                continue
        if not path.is_file():
            raise DataError(f"option {column}_list: {path}: file not found")
        marked, unknown, disagree = 0, 0, 0
        for number, text in read_lines(path):
            if column == "occlusion":  # "test_0003_aligned 3 4": stem, 0-based RAF label, a code 1..4
                fields = text.split()
                if len(fields) < 2 or not fields[1].isdigit():
                    raise line_error(path, number, f"expected '<stem> <label 0..6> [code]', got {text!r}")
                stem, label = raf_stem(fields[0]), int(fields[1])
                code = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            else:  # "0/test_0004_aligned.jpg": 0-based RAF label / aligned file
                label_text, _, name = text.partition("/")
                if not name or not label_text.isdigit():
                    raise line_error(path, number, f"expected '<label 0..6>/<file>', got {text!r}")
                stem, label, code = raf_stem(name), int(label_text), 0
            row = by_stem.get(stem)
            if row is None:
                unknown += 1
                continue
            row[column] = True
            if column == "occlusion":
                row["occlusion_code"] = code
            marked += 1
            disagree += RAFDB_CODES.get(label + 1) != row["expression"]
        note = f"RAN {column} list {path.name}: {marked} test images marked"
        if unknown:
            note += f", {unknown} entries not in the test split"
        if disagree:
            note += f", {disagree} list labels differ from the RAF-DB label file"
        notes.append(note)


@register_dataset("rafdb")
def load_rafdb(
    root: Path,
    *,
    images: str = "aligned",
    occlusion_list: str | None = None,
    pose30_list: str | None = None,
    pose45_list: str | None = None,
) -> DatasetInfo:
    """RAF-DB basic: 12,271 train and 3,068 test images, 7 classes; groups gender, race and age (manual files)."""
    check_choice("images", images, ("aligned", "original"))
    notes: list[str] = []
    base = _locate_official(root, "basic")
    if base is not None:
        rows, counts = _official_rows(root, base, codes=RAFDB_CODES, images=images, dataset="RAF-DB basic")
        layout = "official basic (EmoLabel/list_patition_label.txt, Image/" + images + ")"
        if counts:
            notes.append(
                f"{counts['manual annotation missing']} images have no Annotation/manual file (groups 'unknown')"
            )
    else:
        found = _community_rows(root)
        if found is None:
            raise no_layout_error(
                "RAF-DB",
                root,
                {
                    "official basic": f"{LABEL_FILE} (in the root or in basic/)",
                    "community": "[DATASET/]{train,test}/{1..7}/ or {train,test}/<class name>/",
                    "community csv": "[DATASET/]{train,test}/ with train_labels.csv and test_labels.csv",
                },
            )
        layout, rows = found
        for row in rows:
            if _STEM.match(raf_stem(row["image_id"])):
                row["image_id"] = raf_stem(row["image_id"])
    _ran_subsets(root, rows, {"occlusion": occlusion_list, "pose30": pose30_list, "pose45": pose45_list}, notes)
    return make_info(
        name="rafdb",
        root=root,
        layout=layout,
        label_space=get_label_space("basic7"),
        rows=rows,
        group_columns=GROUP_COLUMNS,
        subset_columns=SUBSET_COLUMNS,
        splits="RAF-DB basic: train (12,271) / test (3,068), 7 classes",
        notes=notes,
    )


@register_dataset("rafdb-compound")
def load_rafdb_compound(root: Path, *, images: str = "aligned") -> DatasetInfo:
    """RAF-DB compound: about 3,162 train and 792 test images in 11 compound classes (their own taxonomy)."""
    check_choice("images", images, ("aligned", "original"))
    base = _locate_official(root, "compound")
    if base is None:
        raise no_layout_error("RAF-DB compound", root, {"official compound": f"{LABEL_FILE} (in root or compound/)"})
    rows, counts = _official_rows(root, base, codes=COMPOUND_CODES, images=images, dataset="RAF-DB compound")
    notes = [f"{counts['manual annotation missing']} images have no Annotation/manual file"] if counts else []
    return make_info(
        name="rafdb-compound",
        root=root,
        layout=f"official compound (EmoLabel/list_patition_label.txt, Image/{images})",
        label_space=get_label_space("rafdb_compound"),
        rows=rows,
        group_columns=GROUP_COLUMNS,
        splits="RAF-DB compound: train / test, 11 compound classes (not mapped onto the basic expressions)",
        notes=notes,
    )
