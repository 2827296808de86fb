"""FaceDataset: a manifest plus a transform → sample dicts for training and evaluation."""

from __future__ import annotations

import zlib
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fer_bench.data.manifest import landmarks_array
from fer_bench.data.perturb import perturb_image
from fer_bench.errors import DataError

# iBUG-300W 68-point left/right correspondence, for horizontal flips.
_IBUG68_FLIP = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)
_FIVE_POINT_FLIP = np.array([1, 0, 2, 4, 3])


def decode_image(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3]; a missing or corrupt file raises DataError naming it."""
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise DataError(f"{path}: image file is missing")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _clamped_box(bbox, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, y0 = min(max(0, int(round(x0))), width - 1), min(max(0, int(round(y0))), height - 1)
    x1, y1 = max(x0 + 1, min(width, int(round(x1)))), max(y0 + 1, min(height, int(round(y1))))
    return x0, y0, x1, y1


def crop_box(image: np.ndarray, bbox) -> np.ndarray:
    """``image`` cropped to ``bbox`` = (x0, y0, x1, y1) in pixels, clamped to the image (never empty).

    Example:
        >>> crop_box(np.zeros((10, 20, 3), np.uint8), [2, 3, 12, 50]).shape
        (7, 10, 3)
    """
    if bbox is None or (isinstance(bbox, float) and np.isnan(bbox)):
        return image
    x0, y0, x1, y1 = _clamped_box(bbox, image.shape)
    return image[y0:y1, x0:x1]


def flip_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 2) landmarks horizontally and swap left/right indices (68- or 5-point order)."""
    mirrored = points.copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    order = _IBUG68_FLIP if len(points) == 68 else _FIVE_POINT_FLIP if len(points) == 5 else None
    return mirrored[order] if order is not None else mirrored


class FaceDataset(Dataset):
    """Images of one manifest split, decoded with OpenCV and passed through an albumentations pipeline.

    Each item is a dict with ``image`` (float [3, S, S]), ``label`` (int64), ``index`` (row in ``rows``) and, when
    asked for, ``landmarks`` ([N, 2] in output pixels), ``occlusion`` (uint8 [S, S]) and ``target`` (float [K]: the
    ``soft_target`` distribution, or for ``target_kind="sample"`` a one-hot class drawn from it).

    Augmentation randomness is a pure function of (``seed``, epoch, index), set by :meth:`set_epoch`, so a resumed
    run and any number of loader workers see exactly the same samples.

    Args:
        rows: Manifest rows (one split).
        root: Folder the ``path`` column is relative to.
        transform: From :func:`fer_bench.data.create_transform`.
        hflip: Horizontal-flip probability (0 for evaluation).
        seed: Base seed for augmentation.
        return_landmarks: Include ``landmarks`` (needs the column).
        occlusion_masks: Optional [N_all, H, W] array indexed by the ``mask_index`` column.
        cache_images: Keep decoded images in memory after the first read (small datasets).
        image_array: In-memory images ([N, H, W] grey or [N, H, W, 3] RGB uint8) indexed by ``array_index``, for
            datasets distributed as pixel tables (FER2013, FERPlus); rows then have an empty ``path``.
        crop_to_bbox: Crop to the ``bbox`` column (x0, y0, x1, y1; clamped to the image) before the transform.
        target_kind: ``label`` (no ``target``), ``soft``, ``multi_target`` (``target`` = ``soft_target``) or
            ``sample`` (a class drawn from ``soft_target`` per (seed, epoch, index)).
        perturb: A test-time perturbation (:mod:`fer_bench.data.perturb`) applied before the transform.
        perturb_seed: Its seed (the draw also depends on each row's image_id).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        *,
        root: Path,
        transform: A.Compose,
        hflip: float = 0.0,
        seed: int = 0,
        return_landmarks: bool = False,
        occlusion_masks: np.ndarray | None = None,
        cache_images: bool = False,
        image_array: np.ndarray | None = None,
        crop_to_bbox: bool = False,
        target_kind: str = "label",
        perturb: str | None = None,
        perturb_seed: int = 0,
    ) -> None:
        self.rows = rows.reset_index(drop=True)
        self.root = Path(root)
        self.transform = transform
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.return_landmarks = return_landmarks
        self.occlusion_masks = occlusion_masks
        self.labels = self.rows["label"].to_numpy(dtype=np.int64)
        self.paths = self.rows["path"].tolist()
        self._cache: dict[int, np.ndarray] | None = {} if cache_images else None
        self.image_array = image_array
        self.crop_to_bbox = crop_to_bbox and "bbox" in self.rows.columns
        self.target_kind = target_kind
        self.perturb, self.perturb_seed = perturb, perturb_seed
        if target_kind != "label" and "soft_target" not in self.rows.columns:
            raise DataError(f"target_kind={target_kind!r} needs a soft_target column; this dataset has none")
        self.soft_targets = (
            np.stack(self.rows["soft_target"].map(np.asarray).to_list()).astype(np.float32)
            if target_kind != "label"
            else None
        )

    @classmethod
    def from_info(
        cls,
        info,
        split: str,
        *,
        transform: A.Compose,
        train: bool = False,
        hflip: float = 0.0,
        seed: int = 0,
        cache_images: bool = False,
        return_landmarks: bool = False,
        rows: pd.DataFrame | None = None,
        perturb: str | None = None,
        perturb_seed: int = 0,
    ) -> FaceDataset:
        """The dataset of one split of a :class:`~fer_bench.data.DatasetInfo`, with the adapter's image source,
        face crop and (for training) its target kind. ``rows`` replaces the split's rows (a filtered subset)."""
        return cls(
            info.split(split) if rows is None else rows,
            root=info.root,
            transform=transform,
            hflip=hflip if train else 0.0,
            seed=seed,
            cache_images=cache_images,
            return_landmarks=return_landmarks,
            image_array=info.extra("images"),
            crop_to_bbox=info.crop_to_bbox,
            target_kind=info.target_kind if train else "label",
            perturb=perturb,
            perturb_seed=perturb_seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int) -> np.ndarray:
        """The RGB uint8 image of row ``index`` (decoded file or in-memory array; cropped when asked)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        if self.image_array is not None:
            image = self.image_array[int(self.rows.at[index, "array_index"])]
            image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        else:
            image = decode_image(self.root / self.paths[index])
        if self.crop_to_bbox:
            image = crop_box(image, self.rows.at[index, "bbox"])
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.load_image(index)
        if self.perturb:
            image = perturb_image(image, self.perturb, seed=self.perturb_seed, key=str(self.rows.at[index, "image_id"]))
        sample_seed = zlib.crc32(f"{self.seed}/{self.epoch}/{index}".encode())
        rng = np.random.default_rng(sample_seed)
        self.transform.set_random_seed(sample_seed)

        targets: dict[str, np.ndarray] = {}
        landmarks = landmarks_array(self.rows.at[index, "landmarks"]) if self.return_landmarks else None
        if landmarks is not None and self.crop_to_bbox:
            x0, y0, *_ = _clamped_box(self.rows.at[index, "bbox"], image.shape)
            landmarks = landmarks - np.array([x0, y0], dtype=np.float32)
        mask = None
        if self.occlusion_masks is not None:
            mask = self.occlusion_masks[int(self.rows.at[index, "mask_index"])]
        if self.hflip > 0 and rng.random() < self.hflip:
            image = image[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
            landmarks = flip_landmarks(landmarks, image.shape[1]) if landmarks is not None else None
        targets["image"] = np.ascontiguousarray(image)
        if mask is not None:
            targets["mask"] = np.ascontiguousarray(mask)
        if landmarks is not None:
            targets["keypoints"] = landmarks
        out = self.transform(**targets)

        item = {"image": out["image"], "label": torch.tensor(self.labels[index]), "index": torch.tensor(index)}
        if landmarks is not None:
            item["landmarks"] = torch.as_tensor(np.asarray(out["keypoints"], dtype=np.float32))
        if mask is not None:
            item["occlusion"] = torch.as_tensor(np.asarray(out["mask"]))
        if self.soft_targets is not None:
            target = self.soft_targets[index]
            if self.target_kind == "sample":  # FER+ "probability": one class per sample and epoch
                drawn = rng.choice(len(target), p=target / target.sum())
                target = np.eye(len(target), dtype=np.float32)[drawn]
            item["target"] = torch.as_tensor(target)
        return item
