"""What a dataset holds: the ``describe`` summary, the comparison with its dataset card, and image verification."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fer_bench.data.dataset import decode_image
from fer_bench.data.manifest import SPLITS, DatasetInfo
from fer_bench.errors import DataError
from fer_bench.shipped import shipped_dir


def describe_dataset(info: DatasetInfo) -> dict[str, Any]:
    """The summary ``ferbench data describe --json`` prints; exactly the keys dataset, layout, label_space, splits
    (split → total and per_label counts), groups (column → value → count), subsets (column → count true) and
    dropped (reason → count)."""
    names = list(info.label_space.names)
    manifest = info.manifest
    splits = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        if len(rows):
            counts = rows["label"].value_counts()
            splits[split] = {
                "total": int(len(rows)),
                "per_label": {n: int(counts.get(i, 0)) for i, n in enumerate(names)},
            }
    groups = {
        c: {str(k): int(v) for k, v in manifest[c].fillna("unknown").astype(str).value_counts().sort_index().items()}
        for c in info.group_columns
        if c in manifest.columns
    }
    subsets = {
        c: int(manifest[c].fillna(False).astype(bool).sum()) for c in info.subset_columns if c in manifest.columns
    }
    return {
        "dataset": info.name,
        "layout": info.layout,
        "label_space": names,
        "splits": splits,
        "groups": groups,
        "subsets": subsets,
        "dropped": {str(k): int(v) for k, v in info.dropped.items()},
    }


def load_card(name: str, cards_dir: Path | None = None) -> dict[str, Any] | None:
    """The dataset card ``<name>.yaml`` as a dict, or None when there is none.

    Args:
        name: The dataset name.
        cards_dir: Folder of cards; None: the shipped ones (``datasets/`` of the repository, carried by the wheel).
    """
    path = (shipped_dir("datasets") if cards_dir is None else Path(cards_dir)) / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML ({exc})") from None
    return card if isinstance(card, dict) else None


def _matches(when: dict[str, Any], info: DatasetInfo, options: dict[str, Any]) -> bool:
    for key, wanted in (when or {}).items():
        if key in ("layout", "splits"):
            text = getattr(info, key)
            if not all(part in text for part in ([wanted] if isinstance(wanted, str) else wanted)):
                return False
        elif options.get(key) != wanted:
            return False
    return True


def count_warnings(
    info: DatasetInfo, summary: dict[str, Any], *, options: dict[str, Any], card: dict[str, Any] | None
) -> list[str]:
    """Compare the split sizes found with the card's ``expected_counts`` entries that match the layout, protocol
    and options (``options`` holds every adapter option, defaults included); one line per mismatch."""
    if not card:
        return []
    warnings = []
    found = {split: s["total"] for split, s in summary["splits"].items()}
    entries = card.get("expected_counts") or []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not _matches(entry.get("when") or {}, info, options):
            continue
        for split, expected in (entry.get("splits") or {}).items():
            if expected is None:
                continue
            have = sum(found.values()) if split == "total" else found.get(split, 0)
            if have != expected:
                source = entry.get("source", "the dataset card")
                warnings.append(f"{split}: found {have:,} images, expected {expected:,} ({source})")
    return warnings


MIN_IMAGE_SIDE = 16  # below this an image holds no usable face (a 1x1 file decodes fine and trains on nothing)


def image_conversions(path: Path) -> tuple[list[str], tuple[int, int]]:
    """What reading ``path`` as RGB uint8 converts (grey to RGB, 16-bit to 8-bit, alpha dropped) and its size (h, w).

    Raises:
        DataError: missing, empty or undecodable (as :func:`decode_image`).
    """
    import cv2

    decode_image(path)  # the errors the loaders would raise, worded the same
    raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    notes = []
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] == 1):
        notes.append("grey, read as RGB")
    elif raw.shape[2] == 4:
        notes.append("alpha channel dropped")
    if raw.dtype != np.uint8:
        notes.append(f"{raw.dtype.itemsize * 8}-bit, scaled to 8-bit")
    return notes, raw.shape[:2]


def verify_images(info: DatasetInfo, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Decode every image of ``info``; return ``{"checked": n, "problems": [(image_id, path, message), ...],
    "converted": {what: count}}``. Images under MIN_IMAGE_SIDE pixels are problems; conversions (grey, 16-bit,
    alpha) are counted, not errors."""
    problems: list[tuple[str, str, str]] = []
    converted: dict[str, int] = {}
    images = info.extra("images")
    manifest = info.manifest
    for row in manifest.itertuples(index=False):
        try:
            if getattr(row, "path", ""):
                notes, (height, width) = image_conversions(info.root / row.path)
                for note in notes:
                    converted[note] = converted.get(note, 0) + 1
                if min(height, width) < MIN_IMAGE_SIDE:
                    raise DataError(f"{width}x{height} px, below the {MIN_IMAGE_SIDE}-px minimum for a face")
            elif images is not None:
                image = np.asarray(images[int(row.array_index)])
                if image.size == 0:
                    raise DataError(f"{row.image_id}: empty in-memory image")
            else:
                raise DataError(f"{row.image_id}: no path and no in-memory image")
        except DataError as exc:
            problems.append((str(row.image_id), str(getattr(row, "path", "")), str(exc)))
        if progress:
            progress(1)
    return {"checked": len(manifest), "problems": problems, "converted": converted}
