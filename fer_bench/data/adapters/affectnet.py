"""AffectNet (Mollahosseini et al., 2017): ``affectnet`` with ``classes`` 7 or 8.

Layouts read:

* ``csv release`` — ``Manually_Annotated_file_lists/{training,validation}.csv`` (a header line is sniffed, not assumed:
  copies of ``validation.csv`` ship without one) with columns subDirectory_filePath, face_x, face_y, face_width,
  face_height, facial_landmarks (136 numbers joined by ``;``), expression, valence, arousal; images under
  ``Manually_Annotated_Images/`` or ``Manually_Annotated/Manually_Annotated_Images/``. Images are cropped to the face
  box ``(x, y, x + w, y + h)`` before the transform.
* ``npy release`` — ``{train_set,val_set}/images/<N>.jpg`` with ``annotations/<N>_exp.npy`` and, when present,
  ``_val``, ``_aro`` and ``_lnd`` arrays.
* ``image folders`` — ``{train,val}/{0..7}/`` (DAN's ``convert_affectnet.py``; folder = AffectNet code) or
  ``{train,val}/<class name>/``.

Codes 0..7 = neutral, happiness, sadness, surprise, fear, disgust, anger, contempt; 8 none, 9 uncertain and 10
non-face are dropped, and ``classes=7`` drops contempt. AffectNet has no public test set: ``test`` is the official
validation set (500 per class: 4,000 for 8 classes, 3,500 for 7; 3,999 / 3,500 in the npy release).
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
)
from fer_bench.data.labels import get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import DataError
from fer_bench.options import check_choice

AFFECTNET_CODES: dict[int, str] = {
    0: "neutral",
    1: "happiness",
    2: "sadness",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: "contempt",
}
DROPPED_CODES: dict[int, str] = {8: "none (code 8)", 9: "uncertain (code 9)", 10: "non-face (code 10)"}
CSV_COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
LISTS_DIR = "Manually_Annotated_file_lists"
IMAGE_DIRS = ("Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images")


def read_affectnet_csv(path: Path, *, split: str, image_dir: str, dropped: Counter) -> list[dict[str, Any]]:
    """Rows of one AffectNet list file; dirty rows are counted in ``dropped``, malformed ones raise file:line."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if not record or not any(field.strip() for field in record):
                continue
            if number == 1 and record[0].strip().lower() == CSV_COLUMNS[0].lower():
                continue  # header line (training.csv has one; some validation.csv copies do not)
            if len(record) != len(CSV_COLUMNS):
                raise line_error(
                    path,
                    number,
                    f"expected {len(CSV_COLUMNS)} comma-separated fields "
                    f"({', '.join(CSV_COLUMNS)}), found {len(record)}",
                )
            if any(field.strip().upper() == "NULL" for field in record):
                dropped["NULL value"] += 1
                continue
            name, x, y, w, h, landmarks, code, valence, arousal = (field.strip() for field in record)
            try:
                x, y, w, h = (float(v) for v in (x, y, w, h))
                code_int = int(code)
                valence_f, arousal_f = float(valence), float(arousal)
            except ValueError:
                raise line_error(
                    path,
                    number,
                    "face box, expression, valence and arousal must be numbers, got "
                    f"{[x, y, w, h, code, valence, arousal]}",
                ) from None
            if code_int in DROPPED_CODES:
                dropped[DROPPED_CODES[code_int]] += 1
                continue
            if code_int not in AFFECTNET_CODES:
                raise line_error(path, number, f"expression {code_int} is not an AffectNet code 0..10")
            if w <= 0 or h <= 0:
                dropped["negative or zero face size"] += 1
                continue
            # Counted here, parsed on use (landmarks_array): parsing 56M numbers would triple the read time.
            if landmarks.count(";") != 135:
                found = landmarks.count(";") + 1 if landmarks else 0
                raise line_error(path, number, f"facial_landmarks has {found} numbers, expected 136 (68 x, y)")
            rows.append(
                {
                    "image_id": name,
                    "path": f"{image_dir}/{name}",
                    "split": split,
                    "expression": AFFECTNET_CODES[code_int],
                    "native_label": str(code_int),
                    "bbox": [x, y, x + w, y + h],
                    "landmarks": landmarks,
                    "valence": valence_f,
                    "arousal": arousal_f,
                }
            )
    return rows


def _scalar(path: Path) -> float:
    try:
        return float(np.load(path, allow_pickle=False).reshape(-1)[0])
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: cannot read a number from this .npy file ({exc})") from None


def read_npy_split(root: Path, folder: Path, *, split: str, dropped: Counter) -> list[dict[str, Any]]:
    """Rows of one npy-release split folder (``images/<N>.jpg`` + ``annotations/<N>_exp.npy`` ...)."""
    rows = []
    annotations = folder / "annotations"
    for exp in sorted(annotations.glob("*_exp.npy")):
        index = exp.name.split("_")[0]
        code = int(_scalar(exp))
        if code in DROPPED_CODES:
            dropped[DROPPED_CODES[code]] += 1
            continue
        if code not in AFFECTNET_CODES:
            raise DataError(f"{exp}: expression {code} is not an AffectNet code 0..10")
        row: dict[str, Any] = {
            # The validation (test) images keep their bare number, so a submission can name them as distributed.
            "image_id": index if split == "test" else f"{folder.name}/{index}",
            "path": (folder / "images" / f"{index}.jpg").relative_to(root).as_posix(),
            "split": split,
            "expression": AFFECTNET_CODES[code],
            "native_label": str(code),
        }
        for suffix, column in (("val", "valence"), ("aro", "arousal")):
            extra = annotations / f"{index}_{suffix}.npy"
            if extra.is_file():
                row[column] = _scalar(extra)
        landmarks = annotations / f"{index}_lnd.npy"
        if landmarks.is_file():
            row["landmarks"] = np.load(landmarks, allow_pickle=False).astype(np.float32).reshape(-1)
        rows.append(row)
    return rows


def _affectnet_folder(name: str) -> str | None:
    return AFFECTNET_CODES.get(int(name)) if name.isdigit() else name_label(name)


@register_dataset("affectnet")
def load_affectnet(root: Path, *, classes: int = 8) -> DatasetInfo:
    """AffectNet-8 or AffectNet-7; ``test`` is the official validation set (4,000 / 3,500 images)."""
    check_choice("classes", classes, (7, 8))
    dropped: Counter = Counter()
    crop = False
    lists = root / LISTS_DIR
    if (lists / "training.csv").is_file() or (lists / "validation.csv").is_file():
        image_dir = next((d for d in IMAGE_DIRS if (root / d).is_dir()), None)
        if image_dir is None:
            raise DataError(f"--root {root}: found {LISTS_DIR}/ but no image folder ({' or '.join(IMAGE_DIRS)})")
        rows = []
        for file, split in (("training.csv", "train"), ("validation.csv", "test")):
            if not (lists / file).is_file():
                raise DataError(f"{lists / file}: file not found (the csv release has training.csv and validation.csv)")
            rows += read_affectnet_csv(lists / file, split=split, image_dir=image_dir, dropped=dropped)
        layout, crop = f"csv release ({LISTS_DIR}/, {image_dir}/)", True
    elif (root / "train_set" / "annotations").is_dir() or (root / "val_set" / "annotations").is_dir():
        rows = []
        for folder, split in (("train_set", "train"), ("val_set", "test")):
            if not (root / folder / "annotations").is_dir():
                raise DataError(f"{root / folder / 'annotations'}: folder not found (npy release)")
            rows += read_npy_split(root, root / folder, split=split, dropped=dropped)
        layout = "npy release ({train_set,val_set}/images, annotations/*_exp.npy)"
    else:
        splits = find_split_folders(root)
        if "train" not in splits or not ({"val", "test"} & set(splits)):
            raise no_layout_error(
                "AffectNet",
                root,
                {
                    "csv release": f"{LISTS_DIR}/training.csv and validation.csv",
                    "npy release": "train_set/annotations/*_exp.npy and val_set/",
                    "image folders": "{train,val}/{0..7}/ or {train,val}/<class name>/",
                },
            )
        # The public validation set is AffectNet's test set, whatever the folder is called.
        folders = {"train": splits["train"], "test": splits.get("val", splits.get("test"))}
        rows = folder_rows(root, folders, label_of=_affectnet_folder, dataset="AffectNet")
        layout = "image folders {train,val}/{0..7 or class name}"
    space = get_label_space("all8" if classes == 8 else "basic7")
    val_count = "4,000" if classes == 8 else "3,500"
    return make_info(
        name="affectnet",
        root=root,
        layout=layout,
        label_space=space,
        rows=rows,
        dropped=dropped,
        splits=f"AffectNet-{classes}: train = training set; test = official validation set ({val_count})",
        crop_to_bbox=crop,
    )
