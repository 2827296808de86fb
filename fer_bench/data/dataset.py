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

from fer_bench.data.au_maps import MAP_SOURCES, draw_au_map, expression_aus, landmarks68, template_landmarks
from fer_bench.data.manifest import landmarks_array
from fer_bench.data.occluders import OCCLUDER_KINDS, check_occluder_kinds, draw_occluder
from fer_bench.data.perturb import perturb_image
from fer_bench.errors import ConfigError, DataError

#: ``heatmaps`` modes of :class:`FaceDataset`.
HEATMAP_MODES: tuple[str, ...] = ("codebook", "generic", "template", "truth")

# iBUG-300W 68-point left/right correspondence, for horizontal flips.
IBUG68_FLIP = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)
FIVE_POINT_FLIP = np.array([1, 0, 2, 4, 3])


def decode_image(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3]; a missing or corrupt file raises DataError naming it."""
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise DataError(f"{path}: image file is missing")
    if data.size == 0:  # cv2.imdecode asserts on an empty buffer instead of returning None
        raise DataError(f"{path}: empty file (0 bytes), not an image")
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


def read_image(*, root: Path, path: str, image_array=None, array_index=None, bbox=None) -> np.ndarray:
    """One manifest row's RGB uint8 image [H, W, 3]: row ``array_index`` of an in-memory ``image_array`` (grey rows
    become RGB) or the file ``root / path``; cropped to ``bbox`` (x0, y0, x1, y1) when one is given."""
    if image_array is not None:
        image = np.asarray(image_array[int(array_index)])
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
    else:
        image = decode_image(Path(root) / path)
    return crop_box(image, bbox) if bbox is not None else image


def crop_origin(bbox, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the region :func:`crop_box` keeps for ``bbox`` on an image of ``shape``."""
    if bbox is None or (isinstance(bbox, float) and np.isnan(bbox)):
        return 0, 0, shape[1], shape[0]
    x0, y0, x1, y1 = _clamped_box(bbox, shape)
    return x0, y0, x1 - x0, y1 - y0


def flip_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 2) landmarks horizontally and swap left/right indices (68- or 5-point order)."""
    mirrored = points.copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    order = IBUG68_FLIP if len(points) == 68 else FIVE_POINT_FLIP if len(points) == 5 else None
    return mirrored[order] if order is not None else mirrored


class FaceDataset(Dataset):
    """Images of one manifest split, decoded with OpenCV and passed through an albumentations pipeline.

    Each item is a dict with ``image`` (float [3, S, S]), ``label`` (int64), ``index`` (row in ``rows``) and, when
    asked for, ``landmarks`` ([N, 2] in output pixels), ``occlusion`` (uint8 [S, S]) and ``target`` (float [K]: the
    ``soft_target`` distribution, or for ``target_kind="sample"`` a one-hot class drawn from it); with ``heatmaps``
    also ``heatmap`` (float [S, S] in [0, 1], zeros when invalid), ``heatmap_valid`` (bool) and ``heatmap_source``
    (index into :data:`fer_bench.data.au_maps.MAP_SOURCES`); with ``occlusion_augment`` also ``clean_image``
    (float [3, S, S]) and ``has_clean`` (bool: ``clean_image`` really is the face without the occluder).

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
        heatmaps: AU maps for the ``au_heatmap`` head and ATT-COS, drawn *after* augmentation from the landmarks that
            went through it: ``codebook`` (the label's codebook AUs on 68 landmarks, fitted from 5, or the per-class
            template when a row has none), ``generic`` (all codebook AUs, same sources), ``template`` (always the
            per-class template), ``truth`` (SynthFER: the rendered regions of the AUs that are active in the image).
        label_names: The label space's class names (needed by ``heatmaps``).
        occlusion_augment: Probability of drawing a synthetic occluder (:mod:`fer_bench.data.occluders`) on a row
            not known to be occluded; the clean image is kept as ``clean_image``.
        occluder_kinds: Which synthetic occluders to draw.
        au_regions: SynthFER's [N_all, n_AU, G, G] region masks (``truth`` maps), indexed by ``mask_index``.
        au_columns: The AU numbers of the ``au_intensity`` column, in order.
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
        heatmaps: str | None = None,
        label_names: tuple[str, ...] = (),
        occlusion_augment: float = 0.0,
        occluder_kinds: tuple[str, ...] = OCCLUDER_KINDS,
        au_regions: np.ndarray | None = None,
        au_columns: tuple[int, ...] = (),
    ) -> None:
        if heatmaps is not None and heatmaps not in HEATMAP_MODES:
            raise ConfigError(f"heatmaps: expected one of {list(HEATMAP_MODES)}, got {heatmaps!r}")
        if heatmaps is not None and not label_names:
            raise ConfigError("heatmaps: the dataset needs label_names to choose each sample's AUs")
        if heatmaps == "truth" and au_regions is None:
            raise ConfigError("heatmaps='truth' needs a dataset with rendered AU regions (SynthFER)")
        self.heatmaps, self.label_names = heatmaps, tuple(label_names)
        self.occlusion_augment = occlusion_augment
        self.occluder_kinds = check_occluder_kinds(occluder_kinds)
        self.au_regions, self.au_columns = au_regions, tuple(au_columns)
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
        heatmaps: str | None = None,
        occlusion_augment: float = 0.0,
        occluder_kinds: tuple[str, ...] = OCCLUDER_KINDS,
        occlusion_masks: bool = False,
    ) -> FaceDataset:
        """The dataset of one split of a :class:`~fer_bench.data.DatasetInfo`, with the adapter's image source,
        face crop and (for training) its target kind. ``rows`` replaces the split's rows (a filtered subset).
        ``occlusion_masks`` adds the dataset's true occlusion masks where it has them (SynthFER)."""
        masks = info.extra("masks") if (occlusion_masks or heatmaps == "truth") else None
        au_columns = ()
        if masks is not None:
            from fer_bench.data.synthfer import ACTION_UNITS

            au_columns = ACTION_UNITS
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
            heatmaps=heatmaps,
            label_names=tuple(info.label_space.names),
            occlusion_augment=occlusion_augment if train else 0.0,
            occluder_kinds=occluder_kinds,
            occlusion_masks=masks["occlusion"] if masks is not None and occlusion_masks else None,
            au_regions=masks["au_regions"] if masks is not None and heatmaps == "truth" else None,
            au_columns=au_columns,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int) -> np.ndarray:
        """The RGB uint8 image of row ``index`` (decoded file or in-memory array; cropped when asked)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = read_image(
            root=self.root,
            path=self.paths[index],
            image_array=self.image_array,
            array_index=self.rows.at[index, "array_index"] if self.image_array is not None else None,
            bbox=self.rows.at[index, "bbox"] if self.crop_to_bbox else None,
        )
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
        landmarks = None
        if self.return_landmarks or self.heatmaps in ("codebook", "generic"):
            landmarks = landmarks_array(self.rows.at[index, "landmarks"]) if "landmarks" in self.rows.columns else None
        if landmarks is not None and self.crop_to_bbox:
            x0, y0, *_ = _clamped_box(self.rows.at[index, "bbox"], image.shape)
            landmarks = landmarks - np.array([x0, y0], dtype=np.float32)
        # The 68 points the AU map is drawn from travel through the augmentation with the image.
        au_points, au_source = None, 0
        if self.heatmaps in ("codebook", "generic", "template"):
            if self.heatmaps != "template":
                au_points, au_source = landmarks68(landmarks)
            if au_points is None:
                au_points, au_source = template_landmarks(image.shape[0], image.shape[1]), MAP_SOURCES.index("template")
        mask = None
        if self.occlusion_masks is not None:
            mask = self.occlusion_masks[int(self.rows.at[index, "mask_index"])]
        truth = self._truth_map(index, image.shape[:2]) if self.heatmaps == "truth" else None
        if self.hflip > 0 and rng.random() < self.hflip:
            image = image[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
            truth = truth[:, ::-1] if truth is not None else None
            landmarks = flip_landmarks(landmarks, image.shape[1]) if landmarks is not None else None
            au_points = flip_landmarks(au_points, image.shape[1]) if au_points is not None else None
        clean, has_clean = None, True
        if self.occlusion_augment > 0 or self.occlusion_masks is not None:
            known = mask is not None and bool(mask.any())
            has_clean = not known  # an image with a real occluder has no clean version
            clean = image
            if not known and rng.random() < self.occlusion_augment:
                image, mask = draw_occluder(np.ascontiguousarray(image), rng, self.occluder_kinds)
            mask = mask if mask is not None else np.zeros(image.shape[:2], np.uint8)
        targets["image"] = np.ascontiguousarray(image)
        if self.occlusion_augment > 0:
            targets["clean_image"] = np.ascontiguousarray(clean)
        if mask is not None:
            targets["mask"] = np.ascontiguousarray(mask)
        if truth is not None:
            targets["masks"] = [np.ascontiguousarray(truth)]
        keypoints = [p for p in (landmarks if self.return_landmarks else None, au_points) if p is not None]
        if keypoints:
            targets["keypoints"] = np.concatenate(keypoints).astype(np.float32)
        out = self.transform(**targets)
        moved = np.asarray(out["keypoints"], dtype=np.float32) if keypoints else None

        item = {"image": out["image"], "label": torch.tensor(self.labels[index]), "index": torch.tensor(index)}
        if landmarks is not None and self.return_landmarks:
            item["landmarks"] = torch.as_tensor(moved[: len(landmarks)])
        if mask is not None:
            item["occlusion"] = torch.as_tensor(np.asarray(out["mask"]))
        if self.occlusion_augment > 0:
            item["clean_image"] = out["clean_image"]
            item["has_clean"] = torch.tensor(has_clean)
        if self.heatmaps is not None:
            size = int(item["image"].shape[-1])
            points = moved[len(moved) - 68 :] if au_points is not None else None
            truth_out = out["masks"][0] if truth is not None else None
            heatmap, source = self._heatmap(index, points, au_source, truth_out, size)
            item["heatmap"] = torch.as_tensor(heatmap if heatmap is not None else np.zeros((size, size), np.float32))
            item["heatmap_valid"] = torch.tensor(heatmap is not None)
            item["heatmap_source"] = torch.tensor(source if heatmap is not None else 0)
        if self.soft_targets is not None:
            target = self.soft_targets[index]
            if self.target_kind == "sample":  # FER+ "probability": one class per sample and epoch
                drawn = rng.choice(len(target), p=target / target.sum())
                target = np.eye(len(target), dtype=np.float32)[drawn]
            item["target"] = torch.as_tensor(target)
        return item

    def _truth_map(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        """SynthFER's true AU map of row ``index`` at image size: the max over the rendered regions of its active
        AUs (intensity at least half the strongest, and ≥ 0.05; none for neutral), bilinearly upsampled."""
        intensity = np.asarray(self.rows.at[index, "au_intensity"], dtype=np.float32)
        regions = self.au_regions[int(self.rows.at[index, "mask_index"])].astype(np.float32)  # [n_AU, G, G]
        active = (intensity >= max(0.05, 0.5 * float(intensity.max()))) if intensity.max() > 0 else intensity > 1
        # the rendered face's own expression: under label noise the training label may say otherwise
        shown = self.rows.at[index, "clean_label"] if "clean_label" in self.rows.columns else self.labels[index]
        if self.label_names[int(shown)] == "neutral" or not active.any():
            return np.zeros(shape, np.float32)
        grid_map = regions[active].max(axis=0)
        return cv2.resize(grid_map, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)

    def _heatmap(
        self, index: int, points: np.ndarray | None, source: int, truth: np.ndarray | None, size: int
    ) -> tuple[np.ndarray | None, int]:
        """The AU map of row ``index`` drawn on its augmented 68 ``points`` (or the augmented true map) and its
        source code in ``MAP_SOURCES``; None when the sample has no map (neutral, contempt)."""
        if self.heatmaps == "truth":
            truth = np.asarray(truth, dtype=np.float32)
            return (truth / truth.max(), MAP_SOURCES.index("truth")) if truth.max() > 0 else (None, 0)
        aus = expression_aus(self.label_names[self.labels[index]], generic=self.heatmaps == "generic")
        if not aus or points is None:
            return None, 0
        heatmap = draw_au_map(points, aus, size)
        return (heatmap, source) if heatmap is not None else (None, 0)
