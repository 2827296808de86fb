"""The manifest: the one contract between data and everything else.

A manifest is a pandas DataFrame with one row per image:

============== ========== ===================================================================================
column         required   meaning
============== ========== ===================================================================================
image_id       yes        unique, stable id (the dataset's own name for the image where it has one)
path           yes        image path relative to the dataset root (may be empty for in-memory images)
split          yes        ``train`` | ``val`` | ``test``
label          yes        int index into the dataset's label space
native_label   adapters   the label exactly as the dataset's files give it (string), kept next to ``label``
soft_target    no         per-class target distribution over the label space (FERPlus votes), for soft training
array_index    no         row in the adapter's in-memory image array (``extras["images"]``) when ``path`` is empty
clean_label    no         the true label where the given one may be noisy
landmarks      no         flat list x0, y0, x1, y1, ... of 68 (iBUG-300W order) or 5 points, in image pixels
                          (or those numbers joined by ``;``, as AffectNet ships them; see ``landmarks_array``)
bbox           no         face box x0, y0, x1, y1 in image pixels
<group>        no         demographic attribute columns the dataset declares (strings; ``unknown`` if missing)
<subset>       no         boolean columns marking evaluation subsets (e.g. ``occluded``)
============== ========== ===================================================================================

A dataset adapter returns a :class:`DatasetInfo` that carries the manifest and says which columns are groups and
which are subsets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
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
        extras: Adapter-specific arrays (e.g. SynthFER's masks, FER2013's pixels), aligned by a manifest column;
            a callable value is loaded on first use.
        splits: How the adapter defines its splits, in words (recorded in every result); the versioned
            evaluation protocol is ``fer_bench.eval.protocols.Protocol``.
        crop_to_bbox: Crop each image to its ``bbox`` column before the transform (AffectNet's full images).
        target_kind: What training fits: ``label`` (hard labels), ``soft`` (cross-entropy on ``soft_target``),
            ``sample`` (one class drawn from ``soft_target`` per sample and epoch) or ``multi_target``
            (FERPlus: -log max_k t_k p_k).
        notes: Facts worth telling the user (missing annotation files, generated folds, ...).
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
    splits: str = ""
    crop_to_bbox: bool = False
    target_kind: str = "label"
    notes: list[str] = field(default_factory=list)

    def extra(self, key: str) -> object:
        """``extras[key]``, loading it on first use when it was stored as a callable."""
        value = self.extras.get(key)
        if callable(value):
            value = self.extras[key] = value()
        return value

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


def with_validation_split(info: DatasetInfo, *, fraction: float, seed: int) -> DatasetInfo:
    """Move a stratified ``fraction`` of ``train`` to a new ``val`` split (for datasets that ship none).

    The draw depends only on (``seed``, the train rows' ids and labels), so every run of a recipe validates on the
    same images. Returns a new DatasetInfo; a dataset that already has ``val`` rows is returned unchanged.
    """
    manifest = info.manifest
    if (manifest["split"] == "val").any():
        return info
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction: expected a value in (0, 1), got {fraction}")
    train = manifest.index[manifest["split"] == "train"]
    if len(train) < 2:
        raise DataError(f"dataset {info.name!r}: no val split and too few train rows ({len(train)}) to carve one")
    rng = np.random.default_rng(seed)
    chosen: list = []
    labels = manifest.loc[train, "label"].to_numpy()
    for label in np.unique(labels):
        members = np.asarray(train[labels == label])
        # At least one image per class that has two or more, so small datasets still validate on every class.
        take = max(1, int(round(len(members) * fraction))) if len(members) >= 2 else 0
        if take and take < len(members):
            chosen.extend(rng.choice(members, size=take, replace=False).tolist())
    manifest = manifest.copy()
    manifest.loc[chosen, "split"] = "val"
    splits = f"{info.splits}; val = {fraction:.0%} of train, stratified, seed {seed}".lstrip("; ")
    return replace(info, manifest=manifest, splits=splits)


def dataset_hash(image_ids, labels) -> str:
    """SHA-256 of the ordered (image_id, label) list: two results with the same hash scored the same rows."""
    h = hashlib.sha256()
    for image_id, label in zip(image_ids, np.asarray(labels).tolist(), strict=True):
        h.update(f"{image_id}\t{label}\n".encode())
    return h.hexdigest()


def landmarks_array(value) -> np.ndarray | None:
    """A manifest ``landmarks`` cell as an (N, 2) float32 array, or None when absent.

    The cell is a flat sequence x0, y0, x1, y1, ... or, as AffectNet distributes them, the same numbers joined by
    ``;`` (parsed here, on use).

    Example:
        >>> landmarks_array("1;2;3;4").tolist(), landmarks_array(None)
        ([[1.0, 2.0], [3.0, 4.0]], None)
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(";")]
        except ValueError:
            raise DataError(f"landmarks {value[:40]!r}...: expected numbers joined by ';'") from None
    arr = np.asarray(value, dtype=np.float32)
    return arr.reshape(-1, 2) if arr.size else None
