"""The manifest: the one contract between data and everything else.

A manifest is a pandas DataFrame with one row per image:

============== ========== ===================================================================================
column         required   meaning
============== ========== ===================================================================================
image_id       yes        unique, stable id (the dataset's own name for the image where it has one)
path           yes        image path relative to the dataset root (may be empty for in-memory images)
split          yes        ``train`` | ``val`` | ``test``
label          yes        int index into the dataset's label space
clean_label    no         the true label where the given one may be noisy
landmarks      no         flat list x0, y0, x1, y1, ... of 68 (iBUG-300W order) or 5 points, in image pixels
bbox           no         face box x0, y0, x1, y1 in image pixels
<group>        no         demographic attribute columns the dataset declares (strings; ``unknown`` if missing)
<subset>       no         boolean columns marking evaluation subsets (e.g. ``occluded``)
============== ========== ===================================================================================

A dataset adapter returns a :class:`DatasetInfo` that carries the manifest and says which columns are groups and
which are subsets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fer_bench.data.labels import LabelSpace
from fer_bench.errors import DataError

REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "path", "split", "label")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class DatasetInfo:
    """A dataset as read from disk: its manifest and what the columns mean.

    Attributes:
        name: Registry name (``synthfer``, ``rafdb``, ...).
        root: Folder the manifest paths are relative to.
        layout: Which on-disk layout was detected.
        label_space: The label space of ``manifest.label``.
        manifest: One row per image (schema above).
        group_columns: Demographic attribute columns.
        subset_columns: Boolean subset columns.
        dropped: Rows left out while reading, by reason.
        extras: Adapter-specific arrays (e.g. SynthFER's masks), aligned by a manifest column.
    """

    name: str
    root: Path
    layout: str
    label_space: LabelSpace
    manifest: pd.DataFrame
    group_columns: tuple[str, ...] = ()
    subset_columns: tuple[str, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (index reset), or a DataError listing the splits that exist."""
        rows = self.manifest[self.manifest["split"] == name].reset_index(drop=True)
        if rows.empty:
            found = sorted(self.manifest["split"].unique())
            raise DataError(f"dataset {self.name!r} at {self.root}: split {name!r} is empty; splits found: {found}")
        return rows


def validate_manifest(manifest: pd.DataFrame, *, num_classes: int, source: str) -> None:
    """Check the manifest contract; raise DataError naming ``source`` and the first problem."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(f"{source}: manifest lacks required columns {missing}")
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{source}: image_id must be unique; {len(duplicated)} duplicates, e.g. {duplicated.iloc[0]!r}")
    bad_split = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"{source}: unknown split values {bad_split}; expected {list(SPLITS)}")
    labels = manifest["label"].to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must lie in [0, {num_classes - 1}], found {labels.min()}..{labels.max()}")


def dataset_hash(image_ids, labels) -> str:
    """SHA-256 of the ordered (image_id, label) list: two results with the same hash scored the same rows."""
    h = hashlib.sha256()
    for image_id, label in zip(image_ids, np.asarray(labels).tolist(), strict=True):
        h.update(f"{image_id}\t{label}\n".encode())
    return h.hexdigest()


def landmarks_array(value) -> np.ndarray | None:
    """A manifest ``landmarks`` cell as an (N, 2) float32 array, or None when absent."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    arr = np.asarray(value, dtype=np.float32)
    return arr.reshape(-1, 2) if arr.size else None
