"""What every face detector returns, and the detector registry (``create_detector``).

A detector takes RGB uint8 images of any sizes and returns, per image, a :class:`Faces`: boxes, scores and the five
landmarks in that image's pixels, in the order the alignment templates use (``LANDMARK_NAMES``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from fer_bench.registry import Registry

T = TypeVar("T")

# Image-left first: "left eye" is the eye on the left of the picture (the subject's right eye).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Faces:
    """The faces found in one image, most confident first.

    Attributes:
        boxes: float32 [k, 4], (x1, y1, x2, y2) in image pixels, clipped to the image.
        scores: float32 [k], detection confidence in [0, 1].
        landmarks: float32 [k, 5, 2], (x, y) in image pixels, in ``LANDMARK_NAMES`` order.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.landmarks = np.asarray(self.landmarks, np.float32).reshape(-1, 5, 2)
        if not len(self.boxes) == len(self.scores) == len(self.landmarks):
            raise ValueError(
                f"Faces: {len(self.boxes)} boxes, {len(self.scores)} scores, {len(self.landmarks)} landmark sets"
            )

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray | Sequence[int]) -> Faces:
        keep = np.asarray(keep, dtype=np.int64)
        return Faces(self.boxes[keep], self.scores[keep], self.landmarks[keep])


class FaceDetector(abc.ABC):
    """Base class. Subclasses set ``name``, ``weights_sha256``, ``weights_source`` and implement :meth:`detect`
    and :meth:`to`.

    ``detect`` takes a list of RGB uint8 [H, W, 3] arrays (sizes may differ) and returns one :class:`Faces` per
    image, computed in batches on ``self.device``; results do not depend on how images are batched.
    """

    name: str = ""
    weights_sha256: str = ""
    weights_source: str = ""
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """One :class:`Faces` per RGB uint8 [H, W, 3] image."""

    def check_images(self, images: Sequence[np.ndarray], *, allow_empty: bool = True) -> None:
        """ValueError naming the first input that is not an RGB uint8 [H, W, 3] array (or is empty, when not
        ``allow_empty``)."""
        for index, image in enumerate(images):
            is_rgb = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            if not (is_rgb and image.dtype == np.uint8):
                found = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                raise ValueError(f"{self.name}: image {index} must be RGB uint8 [H, W, 3], got {found}")
            if not allow_empty and (image.shape[0] == 0 or image.shape[1] == 0):
                raise ValueError(f"{self.name}: image {index} is empty ({image.shape})")

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> FaceDetector:
        """Move the network to ``device``; returns self."""

    def describe(self) -> dict[str, Any]:
        """What a cache or a predictions table records about the detector."""
        return {"detector": self.name, "weights_sha256": self.weights_sha256, "weights_source": self.weights_source}


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` (any iterable, read lazily) in consecutive lists of at most ``size``: a detector's batches, or a
    video's frames."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


DETECTORS: Registry = Registry("face detector")
# name -> identify(weights) -> (sha256, source): which weights a detector would load, without building it
WEIGHT_IDENTITIES: Registry = Registry("face detector")


class LazyDetector(FaceDetector):
    """A detector known by its weights' SHA-256 and source at once, built (network, weights, device memory) on its
    first ``detect``: a prepared cache that is already current, or a DDP rank that reuses rank 0's, never builds it."""

    def __init__(self, name: str, *, weights: str | None, device: str | torch.device, **options: Any) -> None:
        self.name = name
        self.weights_sha256, self.weights_source = WEIGHT_IDENTITIES.get(name)(weights)
        self.device = torch.device(device)
        self._options = options
        self._built: FaceDetector | None = None

    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        if self._built is None:
            self._built = DETECTORS.get(self.name)(weights=self.weights_source, device=self.device, **self._options)
        return self._built.detect(images)

    def describe(self) -> dict[str, Any]:
        return self._built.describe() if self._built is not None else super().describe()

    def to(self, device: str | torch.device) -> LazyDetector:
        self.device = torch.device(device)
        if self._built is not None:
            self._built.to(device)
        return self


def create_detector(
    name: str, *, weights: str | None = None, device: str | torch.device = "cpu", lazy: bool = False, **options: Any
):
    """The detector ``name`` ("retinaface" or "mtcnn") with its released weights, on ``device``.

    Args:
        name: A registered detector.
        weights: A local weights file (or folder / wheel, see each detector); None looks in the usual places and
            says where to get them when they are not there.
        device: Where the network runs.
        lazy: Find and hash the weights now, build the network on the first ``detect`` (:class:`LazyDetector`).
        options: Detector settings (thresholds, ``max_size``...), passed on.

    Raises:
        UnknownNameError: ``name`` is not a detector (with "did you mean").
        WeightsUnavailableError: no weights found; the message says where to get them and where to put them.
    """
    from fer_bench.faces import mtcnn, retinaface  # noqa: F401  (registration)

    factory = DETECTORS.get(name)
    if lazy:
        return LazyDetector(name, weights=weights, device=device, **options)
    return factory(weights=weights, device=device, **options)


def list_detectors() -> list[str]:
    from fer_bench.faces import mtcnn, retinaface  # noqa: F401

    return DETECTORS.names()
