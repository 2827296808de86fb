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


def flip_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 2) landmarks horizontally and swap left/right indices (68- or 5-point order)."""
    mirrored = points.copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    order = _IBUG68_FLIP if len(points) == 68 else _FIVE_POINT_FLIP if len(points) == 5 else None
    return mirrored[order] if order is not None else mirrored


class FaceDataset(Dataset):
    """Images of one manifest split, decoded with OpenCV and passed through an albumentations pipeline.

    Each item is a dict with ``image`` (float [3, S, S]), ``label`` (int64), ``index`` (row in ``rows``) and, when
    asked for, ``landmarks`` ([N, 2] in output pixels) and ``occlusion`` (uint8 [S, S]).

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = decode_image(self.root / self.paths[index])
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.load_image(index)
        sample_seed = zlib.crc32(f"{self.seed}/{self.epoch}/{index}".encode())
        rng = np.random.default_rng(sample_seed)
        self.transform.set_random_seed(sample_seed)

        targets: dict[str, np.ndarray] = {}
        landmarks = landmarks_array(self.rows.at[index, "landmarks"]) if self.return_landmarks else None
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
        return item
