"""FERPlus (Barsoum et al., ICMI 2016): FER2013 images relabelled by 10 crowd votes each, 8 classes.

Layouts read:

* ``csv`` — ``fer2013.csv`` (images as pixel strings) + ``fer2013new.csv`` (Usage, Image name, 10 vote columns
  neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF). Rows are paired **by order**,
  as the official ``generate_training_data.py`` does, never by image name (the names do not match row indices).
  The 173 rows with a blank name are excluded, and for the 4 names used twice the later row wins (the generator
  overwrites the earlier PNG).
* ``generated folders`` — ``FER2013{Train,Valid,Test}/`` with ``label.csv`` (no header; name, face box, 10 votes)
  and the PNGs written by ``generate_training_data.py``.

Options: ``votes_source`` = ``fer2013new`` or ``label_csv`` (the official trainer reads ``label.csv``, whose votes
differ from ``fer2013new.csv`` for 1,602 images; the choice is recorded in every result) and ``mode`` for the train
split: ``majority``, ``probability``, ``crossentropy``, ``multi_target`` (the rules of the official
``ferplus.py``) or ``argmax`` (plain argmax, common in re-implementations). Val and test always use ``majority``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fer_bench.data._registry import register_dataset
from fer_bench.data.adapters._common import line_error, make_info, no_layout_error, read_lines
from fer_bench.data.adapters.fer2013 import fer2013_pixels, find_fer2013_csv, iter_fer2013_csv
from fer_bench.data.labels import get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import DataError
from fer_bench.options import check_choice

VOTE_COLUMNS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
MODES = ("majority", "probability", "crossentropy", "multi_target", "argmax")
TARGET_KIND = {
    "majority": "label",
    "argmax": "label",
    "crossentropy": "soft",
    "probability": "sample",
    "multi_target": "multi_target",
}
FOLDER_SPLITS = {"FER2013Train": "train", "FER2013Valid": "val", "FER2013Test": "test"}
USAGE_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
_SPACE = get_label_space("all8")
# FER+ vote column (first 8) → index in the canonical all8 order.
_TO_CANONICAL = np.array([_SPACE.names.index(name) for name in VOTE_COLUMNS[:8]])


def ferplus_target(votes: Sequence[float], mode: str) -> tuple[np.ndarray | None, str]:
    """The training target of one image under a FER+ mode, or None and the reason it is dropped.

    Rules of ``microsoft/FERPlus`` ``src/ferplus.py``: classes with at most one vote are zeroed (outlier removal);
    ``majority`` keeps the top class if it holds more than half of the remaining votes; ``probability`` and
    ``crossentropy`` take the top classes (at most 3) until 75 % of the votes are covered and drop the image if
    they cover 50 % or less; ``multi_target`` keeps every class with at least 30 % of the votes and drops the image
    if they hold 50 % or less. Any image whose resulting argmax is ``unknown`` or ``NF`` is dropped; otherwise the
    first 8 entries are renormalised. ``argmax`` is the plain argmax of the raw votes (no outlier removal).

    Returns:
        (target [8] in **canonical all8 order** summing to 1, "") or (None, reason).

    Example:
        >>> t, _ = ferplus_target([6, 0, 0, 4, 0, 0, 0, 0, 0, 0], "majority")   # 6 of 10 neutral
        >>> t.round(2).tolist()
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        >>> ferplus_target([5, 0, 0, 5, 0, 0, 0, 0, 0, 0], "majority")[1]   # 50 % is not a majority
        'no majority'
        >>> ferplus_target([6, 0, 0, 4, 0, 0, 0, 0, 0, 0], "crossentropy")[0].round(2).tolist()
        [0.6, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    raw = [float(v) for v in votes]
    size = len(raw)
    if mode == "argmax":
        top = int(np.argmax(raw))
        if top >= 8:
            return None, f"{VOTE_COLUMNS[top]} wins"
        target = np.zeros(8)
        target[top] = 1.0
        return _canonical(target), ""
    raw = [0.0 if v < 1.0 + np.finfo(float).eps else v for v in raw]  # outlier removal: single votes
    total = sum(raw)
    emotion = [0.0] * size
    forced = False
    if mode == "majority":
        top = max(raw)
        if top > 0.5 * total:
            emotion[int(np.argmax(raw))] = top
        else:
            forced = True
    elif mode in ("probability", "crossentropy"):
        covered, count, valid = 0.0, 0, True
        while covered < 0.75 * total and count < 3 and valid:
            top = max(raw)
            for i in range(size):
                if raw[i] == top:
                    emotion[i] = top
                    raw[i] = 0.0
                    covered += emotion[i]
                    count += 1
                    if i >= 8:  # unknown or NF tied in: stop; drop it if real emotions came first
                        valid = False
                        if sum(emotion) > top:
                            emotion[i] = 0.0
                            count -= 1
                        break
        forced = sum(emotion) <= 0.5 * total or count > 3
    elif mode == "multi_target":
        emotion = [v if v >= 0.3 * total else 0.0 for v in raw]
        forced = sum(emotion) <= 0.5 * total
    else:
        raise ValueError(f"unknown FER+ mode {mode!r}")
    if forced:
        return None, "no majority" if mode == "majority" else f"too spread ({mode})"
    top = int(np.argmax(emotion))
    if top >= 8:
        return None, f"{VOTE_COLUMNS[top]} wins"
    target = np.asarray(emotion[:8], dtype=float)
    return _canonical(target / target.sum()), ""


def _canonical(target_fer_order: np.ndarray) -> np.ndarray:
    out = np.zeros(8)
    out[_TO_CANONICAL] = target_fer_order
    return out


def _votes(path: Path, number: int, fields: Sequence[str]) -> list[int]:
    try:
        votes = [int(float(v)) for v in fields]
    except ValueError:
        votes = []
    if len(votes) != 10 or min(votes) < 0:
        raise line_error(
            path, number, f"expected 10 non-negative vote counts ({', '.join(VOTE_COLUMNS)}), got {list(fields)}"
        )
    return votes


def read_fer2013new(path: Path) -> list[tuple[int, str, str, list[int]]]:
    """(file line, split, image name, votes) per data row of ``fer2013new.csv``, in order."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[0].strip() != "Usage" or len(header) != 12:
            raise line_error(path, 1, "expected the header 'Usage,Image name,neutral,...,unknown,NF' (12 columns)")
        for number, record in enumerate(reader, start=2):
            if not record:
                continue
            if len(record) != 12:
                raise line_error(path, number, f"expected 12 fields (Usage, Image name, 10 votes), found {len(record)}")
            usage = record[0].strip()
            if usage not in USAGE_SPLITS:
                raise line_error(path, number, f"Usage {usage!r} is not one of {list(USAGE_SPLITS)}")
            rows.append((number, USAGE_SPLITS[usage], record[1].strip(), _votes(path, number, record[2:])))
    return rows


def read_label_csv(path: Path) -> dict[str, tuple[int, list[int]]]:
    """``label.csv`` of a generated folder: image name → (line, votes); the face-box column is optional."""
    out = {}
    for number, text in read_lines(path):
        record = next(csv.reader([text]))
        if len(record) == 12:  # name, "(x, y, w, h)", 10 votes
            record = [record[0], *record[2:]]
        if len(record) != 11:
            raise line_error(path, number, f"expected 'name,\"(x, y, w, h)\",<10 votes>', found {len(record)} fields")
        out[record[0].strip()] = (number, _votes(path, number, record[1:]))
    return out


def _find_label_csvs(root: Path) -> dict[str, Path] | None:
    for base in (root, root / "data"):
        found = {split: base / folder / "label.csv" for folder, split in FOLDER_SPLITS.items()}
        if all(p.is_file() for p in found.values()):
            return found
    return None


def _votes_by_name(name: str, table: dict[str, list[int]], reason: str, dropped: Counter) -> list[int] | None:
    """The votes for ``name`` from the other votes source, or None (counted under ``reason``)."""
    if name not in table:
        dropped[reason] += 1
        return None
    return table[name]


def _row(image_id: str, split: str, votes: list[int], mode: str, dropped: Counter) -> dict | None:
    target, reason = ferplus_target(votes, mode if split == "train" else "majority")
    if target is None:
        dropped[f"{reason} ({split})"] += 1
        return None
    first8 = np.asarray(votes[:8], dtype=float)
    distribution = _canonical(first8 / first8.sum()) if first8.sum() > 0 else np.zeros(8)
    label = int(np.argmax(target))
    return {
        "image_id": image_id.removesuffix(".png"),  # the FER+ name without extension: fer0000000
        "split": split,
        "expression": _SPACE.names[label],
        "native_label": ",".join(str(v) for v in votes),
        "votes": votes,
        "vote_distribution": distribution.tolist(),
        "soft_target": target.tolist(),
    }


@register_dataset("ferplus")
def load_ferplus(root: Path, *, votes_source: str | None = None, mode: str = "majority") -> DatasetInfo:
    """FERPlus, 8 classes; the official majority protocol keeps 25,045 / 3,191 / 3,137 images (label.csv votes)."""
    check_choice("mode", mode, MODES)
    if votes_source is not None:
        check_choice("votes_source", votes_source, ("fer2013new", "label_csv"))
    dropped: Counter = Counter()
    rows: list[dict] = []
    label_csvs = _find_label_csvs(root)
    fer_csv, new_csv = find_fer2013_csv(root), root / "fer2013new.csv"
    images_in_folders = label_csvs is not None and any(
        next(p.parent.glob("*.png"), None) is not None for p in label_csvs.values()
    )
    if fer_csv is not None and new_csv.is_file() and not images_in_folders:
        source = votes_source or "fer2013new"
        layout = "csv (fer2013.csv + fer2013new.csv, paired by row order)"
        new_rows = read_fer2013new(new_csv)
        fer_rows = list(iter_fer2013_csv(fer_csv))
        if len(new_rows) != len(fer_rows):
            raise DataError(
                f"{new_csv}: {len(new_rows)} data rows but {fer_csv} has {len(fer_rows)}; FER+ pairs "
                "them by order, so both must be complete copies"
            )
        label_votes = {}
        if source == "label_csv":
            if label_csvs is None:
                raise DataError(
                    f"votes_source=label_csv: no FER2013{{Train,Valid,Test}}/label.csv under {root} or {{root}}/data"
                )
            for path in label_csvs.values():
                label_votes |= {name: votes for name, (_, votes) in read_label_csv(path).items()}
        last_index = {name: i for i, (_, _, name, _) in enumerate(new_rows) if name}
        for index, ((number, split, name, votes), (fer_line, _, fer_split, _)) in enumerate(
            zip(new_rows, fer_rows, strict=True)
        ):
            if split != fer_split:
                raise line_error(
                    new_csv,
                    number,
                    f"Usage is {split} but line {fer_line} of {fer_csv.name} is "
                    f"{fer_split}: the files are not the same release (rows are paired by order)",
                )
            if not name:
                dropped["blank image name (excluded by FER+)"] += 1
                continue
            if last_index[name] != index:
                dropped["duplicate image name (a later row reuses it)"] += 1
                continue
            if source == "label_csv":
                votes = _votes_by_name(name, label_votes, "not in label.csv", dropped)
            row = _row(name, split, votes, mode, dropped) if votes is not None else None
            if row is not None:
                rows.append({**row, "path": "", "array_index": index})
        extras = {"images": lambda: fer2013_pixels(fer_csv)}
    elif label_csvs is not None:
        source = votes_source or "label_csv"
        layout = "generated folders FER2013{Train,Valid,Test}/label.csv"
        new_votes: dict[str, list[int]] = {}
        if source == "fer2013new":
            if not new_csv.is_file():
                raise DataError(f"votes_source=fer2013new: {new_csv} not found")
            new_votes = {name: votes for _, _, name, votes in read_fer2013new(new_csv) if name}  # later rows win
        for split, path in label_csvs.items():
            folder = path.parent
            for name, (_, votes) in read_label_csv(path).items():
                if source == "fer2013new":
                    votes = _votes_by_name(name, new_votes, "not in fer2013new.csv", dropped)
                row = _row(name, split, votes, mode, dropped) if votes is not None else None
                if row is not None:
                    rows.append({**row, "path": (folder / name).relative_to(root).as_posix()})
        extras = {}
    else:
        raise no_layout_error(
            "FERPlus",
            root,
            {
                "csv": "fer2013.csv and fer2013new.csv in the root",
                "generated folders": "FER2013Train/, FER2013Valid/, FER2013Test/ each with label.csv "
                "(in the root or in data/)",
            },
        )
    return make_info(
        name="ferplus",
        root=root,
        layout=layout,
        label_space=_SPACE,
        rows=rows,
        dropped=dropped,
        splits=f"FERPlus: train mode {mode}, val/test majority; votes from {source}",
        extras=extras,
        target_kind=TARGET_KIND[mode],
    )
