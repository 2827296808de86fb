"""MTCNN face detection (P-, R-, O-Net cascade), batched, with the weights released in facenet-pytorch (MIT).

The three networks are our own implementation of the MTCNN cascade (Zhang et al., 2016) with the attribute names of
facenet-pytorch 2.6.0 (``conv1``, ``prelu1``, ..., ``dense6_3``), so that its ``pnet.pt``, ``rnet.pt`` and
``onet.pt`` load with ``strict=True``. facenet-pytorch itself is never installed (it pins torch 2.2): the weights are
read out of its wheel, or from a folder holding the three files.

The pipeline reproduces ``facenet_pytorch.MTCNN.detect`` step for step, so that on one image the results are the
reference's (faces.md A2):

* scale pyramid: scales ``12 / min_face_size * factor**k`` while the scaled short side is at least 12 px; each level
  is the image resized with area interpolation to ``int(side * scale + 1)``, normalised to ``(x - 127.5) / 128``;
* PNet: windows with face probability ``>= thresholds[0]`` become 12x12 cells mapped back to the image, NMS (IoU 0.5)
  within each scale, then NMS (IoU 0.7) across scales, box regression with the unpadded width, squared;
* RNet and ONet: each candidate's box is truncated to integer pixels and clipped to the image (no zero padding, so a
  box cut by the border is stretched), area-resized to 24 / 48 px; probability ``> thresholds[1]`` / ``[2]``, box
  regression with the ``+1`` width; after RNet NMS (IoU 0.7) and squaring, after ONet five landmarks and NMS over
  the *smaller* box area (IoU-min 0.7).

Batching: images of the same size go through the pyramid as one stack; the RNet and ONet stages take the candidates
of all images at once, and every NMS is keyed by image, so the results do not depend on how images are batched. The
differences from the reference are deliberate: boxes are clipped to the image (the reference's are not), faces are
ordered by score (the reference puts the largest first by default), a candidate whose crop is empty is dropped (the
reference would misalign its crops and boxes), and NMS coordinates are shifted per image in float64 (see
:func:`nms_by_image`). Landmarks come out image-left eye, image-right eye, nose, image-left and image-right mouth
corner, which is already ``LANDMARK_NAMES`` order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.faces.detection import DETECTORS, WEIGHT_IDENTITIES, FaceDetector, Faces, batched
from fer_bench.faces.weights import load_state_dict_bytes, load_strict, read_zip_member, sha256_file, weights_dir

PACKAGE_VERSION = "2.6.0"  # facenet-pytorch release whose wheel carries the weights (MIT, ~1.9 MB)
NETWORK_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
WHEEL_DATA = "facenet_pytorch/data/"  # where the three files sit inside the wheel (and the installed package)

PNET_CELL, PNET_STRIDE = 12, 2  # each PNet output pixel sees a 12x12 window; windows are 2 px apart
RNET_SIZE, ONET_SIZE = 24, 48
PYRAMID_NMS_IOU = 0.5  # within one scale
CANDIDATE_NMS_IOU = 0.7  # across scales, and after RNet
OUTPUT_NMS_IOM = 0.7  # after ONet, intersection over the smaller area
NET_CHUNK = 512  # candidates per RNet / ONet forward (the reference's chunk; bounds activation memory)


# ---------------------------------------------------------------------------------------------------------------------
# Networks


class PNet(nn.Module):
    """Proposal network: fully convolutional, scores every 12x12 window (stride 2) of a pyramid level."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)  # background / face logits
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)  # box regression, in units of the window size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [N, 3, H, W] normalised -> face probability [N, h, w] and box offsets [N, 4, h, w].

        ``h = ceil((H - 2) / 2) - 4`` (and likewise ``w``): one value per 12x12 window at stride 2.
        """
        x = self.prelu1(self.conv1(x))  # [N, 10, H-2, W-2]
        x = self.pool1(x)  # [N, 10, ceil((H-2)/2), ...]
        x = self.prelu2(self.conv2(x))  # [N, 16, h+2, w+2]
        x = self.prelu3(self.conv3(x))  # [N, 32, h, w]
        probability = F.softmax(self.conv4_1(x), dim=1)[:, 1]  # [N, h, w]
        return probability, self.conv4_2(x)


class RNet(nn.Module):
    """Refinement network: scores 24x24 crops of the PNet candidates and refines their boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [N, 3, 24, 24] normalised -> face probability [N] and box offsets [N, 4]."""
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 28, 11, 11]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 48, 4, 4]
        x = self.prelu3(self.conv3(x))  # [N, 64, 3, 3]
        # The weights come from a TensorFlow model that flattened (W, H, C): permute before flattening to match.
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # [N, 576]
        x = self.prelu4(self.dense4(x))  # [N, 128]
        probability = F.softmax(self.dense5_1(x), dim=1)[:, 1]
        return probability, self.dense5_2(x)


class ONet(nn.Module):
    """Output network: scores 48x48 crops, refines the boxes and places five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [N, 3, 48, 48] normalised -> face probability [N], box offsets [N, 4], landmarks [N, 10].

        Landmarks are fractions of the box: five x values, then five y values.
        """
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 32, 23, 23]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 64, 10, 10]
        x = self.pool3(self.prelu3(self.conv3(x)))  # [N, 64, 4, 4]
        x = self.prelu4(self.conv4(x))  # [N, 128, 3, 3]
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # [N, 1152], TensorFlow's (W, H, C) order
        x = self.prelu5(self.dense5(x))  # [N, 256]
        probability = F.softmax(self.dense6_1(x), dim=1)[:, 1]
        return probability, self.dense6_2(x), self.dense6_3(x)


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline pieces (all boxes are float32 [K, 4+] rows x1, y1, x2, y2, ...; the reference's arithmetic, op for op)


def scale_pyramid(height: int, width: int, min_face_size: int = 20, factor: float = 0.709) -> list[float]:
    """The image scales PNet sees: a ``min_face_size`` face becomes 12 px, then shrinks by ``factor`` per level
    while the short side stays at least 12 px. Empty for an image too small to hold a 12 px window."""
    scale = 12.0 / min_face_size
    short_side = min(height, width) * scale
    scales = []
    while short_side >= PNET_CELL:
        scales.append(scale)
        scale *= factor
        short_side *= factor
    return scales


def pyramid_level_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) of the pyramid level at ``scale`` (the reference's ``int(side * scale + 1)``)."""
    return int(height * scale + 1), int(width * scale + 1)


def nms_by_image(boxes: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy NMS run separately per image, most confident first (ties: input order).

    ``torchvision.ops.batched_nms`` separates images by shifting image ``i``'s boxes by ``i * (max + 1)``; in float32
    that shift would round the coordinates of later images, so the boxes are shifted in float64, where it is exact
    and image ``i`` gets the result it gets alone. The kept indices are put back into a fixed order (score
    descending, ties by position) because torchvision's order for tied scores depends on how many boxes it saw.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = batched_nms(boxes.double(), scores.double(), image_index, iou).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def min_area_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS on one image's float32 boxes [K, 4], overlap measured over the smaller box ("Min"), pixel areas
    counted inclusively (``x2 - x1 + 1``). Returns kept indices, most confident first.

    Mirrors facenet-pytorch's numpy ``nms_numpy`` exactly, including numpy's default argsort (whose tie order is
    part of the result) and float32 arithmetic, so the surviving face is the reference's even among equal scores.
    """
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)  # ascending: the best is last
    keep = []
    while order.size > 0:
        best, rest = order[-1], order[:-1]
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = width * height / np.minimum(area[best], area[rest])
        keep.append(best)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def regress_boxes(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``boxes`` [K, 5] (x1, y1, x2, y2, score) moved by ``offsets`` [K, 4], in units of the inclusive width/height."""
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    sizes = torch.stack([width, height, width, height], dim=1)
    return torch.cat([boxes[:, :4] + offsets * sizes, boxes[:, 4:]], dim=1)


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` [K, 5+] made square around their centre with the longer side (the reference's ``rerec``)."""
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    side = torch.max(width, height)
    x1 = boxes[:, 0] + width * 0.5 - side * 0.5
    y1 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], dim=1), boxes[:, 4:]], dim=1)


def crop_windows(boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel windows [K, 4] (y0, y1, x0, x1; half-open) of ``boxes`` inside their images, and [K] whether
    each is non-empty. As in the reference: coordinates truncated toward zero, the top-left corner taken as 1-based
    and clipped at 1, the bottom-right clipped at the image size (``heights`` / ``widths`` [K], per box)."""
    corners = boxes[:, :4].trunc().long()
    x0 = corners[:, 0].clamp(min=1) - 1
    y0 = corners[:, 1].clamp(min=1) - 1
    x1 = torch.minimum(corners[:, 2], widths)
    y1 = torch.minimum(corners[:, 3], heights)
    return torch.stack([y0, y1, x0, x1], dim=1), (y1 > y0) & (x1 > x0)


def integral_image(image: torch.Tensor) -> torch.Tensor:
    """Summed-area table [3, H+1, W+1] (int64, exact) of a uint8 image [3, H, W]."""
    table = torch.zeros((image.shape[0], image.shape[1] + 1, image.shape[2] + 1), dtype=torch.long, device=image.device)
    table[:, 1:, 1:] = image.long().cumsum(1).cumsum(2)
    return table


def area_resize_crops(table: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Crops [K, 3, size, size] (float32) of one image, each window [K, 4] (y0, y1, x0, x1) area-resized.

    Equals ``F.interpolate(crop, (size, size), mode="area")`` per crop bit for bit (adaptive average pooling: output
    cell ``i`` averages input rows ``floor(i * n / size)`` to ``ceil((i + 1) * n / size)``, the sum divided by the
    window height and then its width), but reads every window from the summed-area table ``table`` at once instead
    of one interpolation per candidate.
    """
    cells = torch.arange(size, device=windows.device)

    def bounds(start: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = (stop - start)[:, None]  # [K, 1]
        lo = start[:, None] + cells * length // size  # [K, size]
        hi = start[:, None] + ((cells + 1) * length + size - 1) // size
        return lo, hi

    row0, row1 = bounds(windows[:, 0], windows[:, 1])
    col0, col1 = bounds(windows[:, 2], windows[:, 3])
    r0, r1, c0, c1 = row0[:, :, None], row1[:, :, None], col0[:, None, :], col1[:, None, :]
    sums = table[:, r1, c1] - table[:, r0, c1] - table[:, r1, c0] + table[:, r0, c0]  # [3, K, size, size]
    # float32 window sums are exact (integers below 2**24 for any window up to 256x256 px, as in the reference).
    means = sums.float() / (r1 - r0).float() / (c1 - c0).float()
    return means.permute(1, 0, 2, 3)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """MTCNN's input scaling, [0, 255] -> about [-1, 1]."""
    return (pixels - 127.5) * 0.0078125


# ---------------------------------------------------------------------------------------------------------------------
# Weights


@dataclass
class MTCNNWeights:
    """The three state dicts and what :meth:`FaceDetector.describe` reports about them."""

    pnet: dict[str, torch.Tensor]
    rnet: dict[str, torch.Tensor]
    onet: dict[str, torch.Tensor]
    sha256: str
    source: str


def _where_to_get() -> str:
    return (
        f"run `pip download facenet-pytorch=={PACKAGE_VERSION} --no-deps -d {weights_dir()}` (MIT, ~1.9 MB; fer_bench "
        "reads the weights from the wheel without installing it) or pass --detector-weights PATH"
    )


def installed_package_data() -> Path | None:
    """The ``data`` folder of an installed facenet_pytorch, found without importing it (its import pulls torch pins
    and PIL); None when it is not installed or lacks the three files."""
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "data"
        if all((folder / name).is_file() for name in NETWORK_FILES):
            return folder
    return None


def resolve_weights(weights: str | os.PathLike | None) -> Path:
    """Where the weights are: ``weights`` itself (a facenet-pytorch wheel or a folder with pnet.pt, rnet.pt,
    onet.pt), else an installed facenet_pytorch, a ``facenet_pytorch-*.whl`` in ``weights_dir()`` or
    ``weights_dir()/mtcnn/``.

    Raises:
        WeightsUnavailableError: ``weights`` does not exist, or nothing was found (one line, with the remedy).
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsUnavailableError(f"MTCNN weights not found: {path} does not exist; {_where_to_get()}")
        return path
    installed = installed_package_data()
    if installed is not None:
        return installed
    wheels = sorted(weights_dir().glob("facenet_pytorch-*.whl"))
    if wheels:
        return wheels[-1]  # the highest version when several were downloaded
    folder = weights_dir() / "mtcnn"
    if folder.is_dir():
        return folder
    raise WeightsUnavailableError(
        f"MTCNN weights not found: no installed facenet_pytorch, no facenet_pytorch-*.whl in {weights_dir()} and no "
        f"{folder} folder with {', '.join(NETWORK_FILES)}; {_where_to_get()}"
    )


def read_weights(path: str | os.PathLike) -> MTCNNWeights:
    """The three state dicts in ``path``: a facenet-pytorch wheel (read as a zip, never installed) or a folder.

    ``sha256`` is the wheel's own digest, or for a folder the digest of pnet.pt, rnet.pt and onet.pt concatenated.

    Raises:
        WeightsUnavailableError: a file is missing, unreadable or not a state dict (one line naming it).
    """
    path = Path(path)
    states = []
    if path.is_dir():
        digest = hashlib.sha256()
        for name in NETWORK_FILES:
            file = path / name
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise WeightsUnavailableError(
                    f"MTCNN weights: cannot read {file} ({exc.strerror}); {path} must hold {', '.join(NETWORK_FILES)}"
                ) from None
            digest.update(data)
            states.append(load_state_dict_bytes(data, where=str(file)))
        sha256 = digest.hexdigest()
    else:
        for name in NETWORK_FILES:
            try:
                data, member = read_zip_member(path, WHEEL_DATA + name)
            except (OSError, EOFError, zipfile.LargeZipFile) as exc:  # BadZipFile is handled by read_zip_member
                raise WeightsUnavailableError(f"{path}: not a readable zip file ({exc})") from None
            states.append(load_state_dict_bytes(data, where=f"{path} (member {member})"))
        sha256 = sha256_file(path)
    return MTCNNWeights(*states, sha256=sha256, source=str(path.resolve()))


# ---------------------------------------------------------------------------------------------------------------------
# Detector


class MTCNNDetector(FaceDetector):
    """Batched MTCNN; see the module docstring for the pipeline.

    Args:
        weights: The three state dicts (:func:`read_weights`).
        device: Where the networks, resizing and box arithmetic run (the final NMS runs in numpy, as the reference's).
        min_face_size: Smallest face searched for, in pixels (sets the first pyramid scale, 12 / min_face_size).
        thresholds: Face-probability thresholds of PNet, RNet and ONet.
        factor: Scale ratio between pyramid levels, in (0, 1).
        batch_size: Images detected together (same-size images share each PNet pass).
    """

    name = "mtcnn"

    def __init__(
        self,
        weights: MTCNNWeights,
        *,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        batch_size: int = 16,
    ) -> None:
        for label, value in (("min_face_size", min_face_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"mtcnn: {label} must be a positive integer, got {value!r}")
        if not 0.0 < float(factor) < 1.0:  # a factor of 1 or more never ends the pyramid
            raise ConfigError(f"mtcnn: factor must be in (0, 1), got {factor!r}")
        if len(thresholds) != 3 or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
            raise ConfigError(f"mtcnn: thresholds must be three probabilities (PNet, RNet, ONet), got {thresholds!r}")
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        where = weights.source or "state dict"
        for network, state, file in zip(
            (self.pnet, self.rnet, self.onet), (weights.pnet, weights.rnet, weights.onet), NETWORK_FILES, strict=True
        ):
            load_strict(network, state, where=f"{where} ({file})", what=f"MTCNN {type(network).__name__}")
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.batch_size = batch_size
        self.weights_sha256 = weights.sha256
        self.weights_source = weights.source
        self.to(device)

    def to(self, device: str | torch.device) -> MTCNNDetector:
        self.device = torch.device(device)
        for network in (self.pnet, self.rnet, self.onet):
            network.to(self.device).eval()
        return self

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "min_face_size": self.min_face_size,
            "thresholds": list(self.thresholds),
            "factor": self.factor,
        }

    # -- detection ------------------------------------------------------------------------------------------------

    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """One :class:`Faces` per RGB uint8 [H, W, 3] image, boxes clipped to that image, most confident first."""
        self.check_images(images)
        # Same-size images next to each other, so that each batch holds as few sizes (PNet stacks) as possible.
        order = sorted(range(len(images)), key=lambda i: images[i].shape[:2])
        results: list[Faces] = [Faces()] * len(images)
        with torch.inference_mode():
            for chunk in batched(order, self.batch_size):
                for i, faces in zip(chunk, self._detect_batch([images[i] for i in chunk]), strict=True):
                    results[i] = faces
        return results

    def _detect_batch(self, images: list[np.ndarray]) -> list[Faces]:
        """The cascade on a few images at once (``image_index`` below numbers them 0..len-1)."""
        device = self.device
        sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long, device=device)  # [B, 2] (h, w)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        pixels: list[torch.Tensor] = [torch.empty(0)] * len(images)  # uint8 [3, H, W] views, for the crops
        found = []
        # Stage 1: PNet over each size's pyramid, NMS within each scale, then across scales.
        for group in groups.values():
            # [N, 3, H, W] viewed on NHWC memory (channels_last), as the reference builds its stack: the convolutions
            # then take the same path and produce the reference's scores to the last bit.
            stack = torch.from_numpy(np.stack([images[i] for i in group])).to(device).permute(0, 3, 1, 2)
            for n, i in enumerate(group):
                pixels[i] = stack[n]
            found.append(self._propose(stack.float(), group))
        boxes = torch.cat([f[0] for f in found])  # [K, 9] x1, y1, x2, y2, score, 4 offsets
        image_index = torch.cat([f[1] for f in found])  # [K]
        keep = nms_by_image(boxes[:, :4], boxes[:, 4], image_index, CANDIDATE_NMS_IOU)
        boxes, image_index = boxes[keep], image_index[keep]
        # PNet offsets are in units of the exclusive width (x2 - x1), unlike the later stages' inclusive one.
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        moved = boxes[:, :4] + boxes[:, 5:9] * torch.stack([width, height, width, height], dim=1)
        boxes = square_boxes(torch.cat([moved, boxes[:, 4:5]], dim=1))  # [K, 5]

        # Stage 2: RNet on 24x24 crops of every candidate of every image.
        boxes, image_index, crops = self._crops(boxes, image_index, pixels, sizes, RNET_SIZE)
        probability, offsets = _run_chunked(self.rnet, crops)
        passed = probability > self.thresholds[1]
        boxes = torch.cat([boxes[passed, :4], probability[passed, None]], dim=1)
        image_index, offsets = image_index[passed], offsets[passed]
        keep = nms_by_image(boxes[:, :4], boxes[:, 4], image_index, CANDIDATE_NMS_IOU)
        boxes = square_boxes(regress_boxes(boxes[keep], offsets[keep]))
        image_index = image_index[keep]

        # Stage 3: ONet on 48x48 crops: final score, box and landmarks.
        boxes, image_index, crops = self._crops(boxes, image_index, pixels, sizes, ONET_SIZE)
        probability, offsets, points = _run_chunked(self.onet, crops)
        passed = probability > self.thresholds[2]
        boxes = torch.cat([boxes[passed, :4], probability[passed, None]], dim=1)
        image_index, offsets, points = image_index[passed], offsets[passed], points[passed]
        # Landmarks are fractions of the (pre-regression) box, measured from its 1-based corner.
        width = boxes[:, 2] - boxes[:, 0] + 1
        height = boxes[:, 3] - boxes[:, 1] + 1
        points_x = width[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        points_y = height[:, None] * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = torch.stack([points_x, points_y], dim=2)  # [K, 5, 2]
        boxes = regress_boxes(boxes, offsets)

        boxes_np, landmarks_np = boxes.cpu().numpy(), landmarks.cpu().numpy()
        index_np = image_index.cpu().numpy()
        out = []
        for i, image in enumerate(images):
            mine = np.flatnonzero(index_np == i)
            mine = mine[min_area_nms(boxes_np[mine, :4], boxes_np[mine, 4], OUTPUT_NMS_IOM)]
            mine = mine[np.argsort(-boxes_np[mine, 4], kind="stable")]
            height, width = image.shape[:2]
            clipped = boxes_np[mine, :4].clip(0, [width, height, width, height])
            inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])  # not wholly off the image
            out.append(Faces(clipped[inside], boxes_np[mine, 4][inside], landmarks_np[mine][inside]))
        return out

    def _propose(self, stack: torch.Tensor, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """PNet candidates [K, 9] (x1, y1, x2, y2, score, 4 offsets) of a same-size float stack [N, 3, H, W] and
        their image numbers [K] (``members[n]`` for stack entry ``n``), after NMS within each scale."""
        height, width = stack.shape[2:]
        found_boxes = [torch.zeros((0, 9), device=stack.device)]
        found_index = [torch.zeros(0, dtype=torch.long, device=stack.device)]
        members_t = torch.tensor(members, dtype=torch.long, device=stack.device)
        for scale in scale_pyramid(height, width, self.min_face_size, self.factor):
            level = normalise(F.interpolate(stack, size=pyramid_level_size(height, width, scale), mode="area"))
            probability, offsets = self.pnet(level)  # [N, h, w], [N, 4, h, w]
            hit = probability >= self.thresholds[0]
            where = hit.nonzero()  # [K, 3] (n, row, column), row-major as the reference
            if len(where) == 0:
                continue
            # Window (row, column) of the level covers image pixels [(2 * c + 1) / scale, (2 * c + 12) / scale].
            corner = where[:, [2, 1]].to(probability.dtype)
            top_left = ((PNET_STRIDE * corner + 1) / scale).floor()
            bottom_right = ((PNET_STRIDE * corner + PNET_CELL) / scale).floor()
            boxes = torch.cat([top_left, bottom_right, probability[hit][:, None], offsets.permute(0, 2, 3, 1)[hit]], 1)
            keep = nms_by_image(boxes[:, :4], boxes[:, 4], where[:, 0], PYRAMID_NMS_IOU)
            found_boxes.append(boxes[keep])
            found_index.append(members_t[where[keep, 0]])
        return torch.cat(found_boxes), torch.cat(found_index)

    def _crops(
        self,
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        pixels: list[torch.Tensor],
        sizes: torch.Tensor,
        size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidates whose crop is not empty, their image numbers and their crops [K, 3, size, size], normalised.

        Each image's crops are read from its summed-area table in one go (the table is built once per image and
        stage, and dropped after, so memory holds one image's table at a time).
        """
        windows, valid = crop_windows(boxes, sizes[image_index, 0], sizes[image_index, 1])
        boxes, image_index, windows = boxes[valid], image_index[valid], windows[valid]
        crops = torch.empty((len(boxes), 3, size, size), device=boxes.device)
        for i in image_index.unique().tolist():
            mine = (image_index == i).nonzero()[:, 0]
            table = integral_image(pixels[i])
            for part in mine.split(NET_CHUNK):  # bounds the [3, K, size, size] int64 gathers
                crops[part] = area_resize_crops(table, windows[part], size)
        return boxes, image_index, normalise(crops)


def _run_chunked(network: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``network`` on ``crops`` NET_CHUNK at a time, outputs concatenated (empty outputs for no crops)."""
    if len(crops) == 0:
        return tuple(o[:0] for o in network(torch.zeros((1, *crops.shape[1:]), device=crops.device)))
    outputs = [network(part) for part in crops.split(NET_CHUNK)]
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def create_mtcnn(
    *, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", **options: Any
) -> MTCNNDetector:
    """The registered factory: MTCNN with facenet-pytorch's released weights on ``device``.

    Args:
        weights: A facenet-pytorch wheel (``facenet_pytorch-2.6.0-py3-none-any.whl``, read as a zip) or a folder
            holding pnet.pt, rnet.pt and onet.pt. None looks for an installed facenet_pytorch (without importing
            it), then a ``facenet_pytorch-*.whl`` in ``weights_dir()``, then ``weights_dir()/mtcnn/``.
        options: :class:`MTCNNDetector`'s settings (``min_face_size``, ``thresholds``, ``factor``, ``batch_size``;
            the defaults are facenet-pytorch's).

    Raises:
        WeightsUnavailableError: missing, corrupt or foreign weights (one line, with the remedy).
    """
    return MTCNNDetector(read_weights(resolve_weights(weights)), device=device, **options)


def identify_weights(weights: str | os.PathLike | None) -> tuple[str, str]:
    """(SHA-256, source) of the weights ``create_mtcnn`` would load."""
    found = read_weights(resolve_weights(weights))
    return found.sha256, found.source


DETECTORS.register("mtcnn", create_mtcnn)
WEIGHT_IDENTITIES.register("mtcnn", identify_weights)
