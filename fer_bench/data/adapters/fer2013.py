"""FER2013 (Goodfellow et al., ICML 2013 challenge): ``fer2013``, 7 classes, 48×48 grey images.

Layouts read:

* ``fer2013.csv`` — columns emotion, pixels (2,304 space-separated grey values), Usage; Training / PublicTest /
  PrivateTest = train / val / test (28,709 / 3,589 / 3,589). Images are decoded from the pixel strings; no PNG
  export is needed.
* ``class-name folders`` — ``{train,test}/<class name>/`` (the Kaggle image re-packaging; its test folder holds
  PublicTest + PrivateTest, 7,178 images, and there is no val split).

Codes 0..6 = angry, disgust, fear, happy, sad, surprise, neutral.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

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

FER2013_CODES: dict[int, str] = {
    0: "anger",
    1: "disgust",
    2: "fear",
    3: "happiness",
    4: "sadness",
    5: "surprise",
    6: "neutral",
}
USAGE_SPLITS: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
PIXELS = 48 * 48


def find_fer2013_csv(root: Path) -> Path | None:
    for candidate in (root / "fer2013.csv", root / "fer2013" / "fer2013.csv"):
        if candidate.is_file():
            return candidate
    return None


def iter_fer2013_csv(path: Path) -> Iterator[tuple[int, int, str, str]]:
    """Yield (file line, emotion code, split, pixel string) for each data row of ``fer2013.csv``, in order."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:3]] != ["emotion", "pixels", "usage"]:
            raise line_error(path, 1, f"expected the header 'emotion,pixels,Usage', got {header!r}")
        for number, record in enumerate(reader, start=2):
            if not record:
                continue
            if len(record) != 3:
                raise line_error(path, number, f"expected 3 fields (emotion, pixels, Usage), found {len(record)}")
            code, pixels, usage = (field.strip() for field in record)
            if usage not in USAGE_SPLITS:
                raise line_error(path, number, f"Usage {usage!r} is not one of {list(USAGE_SPLITS)}")
            if not code.isdigit() or int(code) not in FER2013_CODES:
                raise line_error(path, number, f"emotion {code!r} is not a FER2013 code 0..6")
            yield number, int(code), USAGE_SPLITS[usage], pixels


def fer2013_pixels(path: Path) -> np.ndarray:
    """All images of ``fer2013.csv`` as uint8 [N, 48, 48], in file order (row i is data row i).

    Fast path: pandas reads the pixel column and one C pass parses every value. Only when the total is off does a
    row-by-row pass run, to name the malformed line.
    """
    import pandas as pd

    try:
        column = pd.read_csv(path, usecols=[1], dtype=str, keep_default_na=False).iloc[:, 0]
        values = np.fromstring(" ".join(column.tolist()), dtype=np.int64, sep=" ")  # text mode: not deprecated
        if values.size == len(column) * PIXELS and (values.size == 0 or (values.min() >= 0 and values.max() <= 255)):
            return values.astype(np.uint8).reshape(len(column), 48, 48)
    except (ValueError, pd.errors.ParserError):
        pass
    for number, _, _, pixels in iter_fer2013_csv(path):
        row = np.fromstring(pixels, dtype=np.int64, sep=" ") if pixels else np.zeros(0, np.int64)
        if row.size != PIXELS or row.min() < 0 or row.max() > 255:
            raise line_error(path, number, f"pixels must be {PIXELS} values in 0..255 (48x48), found {row.size}")
    raise DataError(f"{path}: the pixels column could not be read as {PIXELS} integers per row")


@register_dataset("fer2013")
def load_fer2013(root: Path) -> DatasetInfo:
    """FER2013: train / val (PublicTest) / test (PrivateTest), 7 classes."""
    csv_path = find_fer2013_csv(root)
    if csv_path is not None:
        rows = [
            {
                "image_id": f"fer2013_{index:05d}",
                "path": "",
                "array_index": index,
                "split": split,
                "expression": FER2013_CODES[code],
                "native_label": str(code),
            }
            for index, (_, code, split, _) in enumerate(iter_fer2013_csv(csv_path))
        ]
        return make_info(
            name="fer2013",
            root=root,
            layout=f"fer2013.csv ({csv_path.relative_to(root)})",
            label_space=get_label_space("basic7"),
            rows=rows,
            splits="FER2013: Training / PublicTest / PrivateTest = train / val / test",
            extras={"images": lambda: fer2013_pixels(csv_path)},
        )
    splits = find_split_folders(root)
    if "train" not in splits or "test" not in splits:
        raise no_layout_error(
            "FER2013", root, {"csv": "fer2013.csv (emotion,pixels,Usage)", "folders": "{train,test}/<class name>/"}
        )
    rows = folder_rows(root, splits, label_of=name_label, dataset="FER2013")
    if any(row["expression"] == "contempt" for row in rows):
        raise DataError(f"--root {root}: a contempt folder was found, but FER2013 has 7 classes")
    return make_info(
        name="fer2013",
        root=root,
        layout="class-name folders {train,test}/<class>",
        label_space=get_label_space("basic7"),
        rows=rows,
        splits="FER2013 folders: train / test (PublicTest + PrivateTest)",
    )
