"""RetinaFace (ResNet-50) face detection, batched, with the released ternaus/retinaface-pytorch weights.

The network is our own implementation of the model in ``ternaus/retinaface`` (MIT, which builds on
biubug6/Pytorch_Retinaface): a torchvision ResNet-50 body returning C3/C4/C5, a three-level FPN, one SSH context
module per level and 1x1 class / box / landmark heads with two anchors per location. Its module and attribute
names (including the mixed-case ``conv3X3`` / ``conv7x7_3``) are chosen so that ``state_dict()`` has exactly the
released checkpoint's keys and shapes (456 tensors, 27,351,657 parameters) and the weights load with
``strict=True``.

Pre- and post-processing follow retinaface-pytorch 0.0.8 (``Model.predict_jsons``), batched (faces.md A1.6):

* resize so the longest side is ``max_size`` (INTER_LINEAR, sides rounded to the nearest pixel as albumentations
  1.0.0 did; 2.x truncates), normalise with the ImageNet mean and std on the device;
* every image is padded bottom/right to its *own* size rounded up to 32 (its "bucket"), with 0 after normalisation
  (the mean colour), and only images of the same bucket share a batch. The padded size therefore depends on the
  image alone, so results do not depend on how images are batched. The priors cover the padded size; where the
  resized image is already a multiple of 32 there is no padding and the result is the reference's;
* softmax, decode against the priors (variances 0.1 / 0.2), threshold, per-image NMS in one
  ``torchvision.ops.batched_nms`` call, keep ``top_k`` per image, map back to the original pixels and clip the
  boxes to the image (the reference emits unclipped boxes).

Coordinates are continuous pixels (pixel ``i`` spans ``[i, i + 1)``), as in the reference; landmarks are not clipped
(a face cut by the border keeps its extrapolated landmarks).

Weights: ``retinaface_resnet50_2020-07-20-f168fae3c.zip`` from the ternaus/retinaface GitHub release, a single-member
zip holding a ``torch.save``'d state dict (MIT-licensed code, trained on WIDER FACE). Always loaded with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import batched_nms

from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.faces.detection import DETECTORS, WEIGHT_IDENTITIES, FaceDetector, Faces, batched
from fer_bench.faces.weights import load_state_dict_bytes, load_strict, sha256_file, weights_dir

RELEASE_FILE = "retinaface_resnet50_2020-07-20-f168fae3c.zip"
RELEASE_URL = f"https://github.com/ternaus/retinaface/releases/download/0.01/{RELEASE_FILE}"

# Anchor layout of the released model (retinaface configs/2020-07-20.yaml): one level per stride, two sizes each.
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 32  # the coarsest stride: padded sides divide evenly into every feature map

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------------------------
# Network


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, *, relu: bool) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU): indices 0 and 1 give the checkpoint's ``.0.weight`` / ``.1.running_mean``.

    The reference uses LeakyReLU with slope 0 for 256 channels, which is a ReLU (and has no parameters).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 laterals to ``out_channels``, nearest upsampling, 3x3 merges."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out_channels, 1, relu=True)
        self.output2 = _conv_bn(in_channels[1], out_channels, 1, relu=True)
        self.output3 = _conv_bn(in_channels[2], out_channels, 1, relu=True)
        self.merge1 = _conv_bn(out_channels, out_channels, 3, relu=True)
        self.merge2 = _conv_bn(out_channels, out_channels, 3, relu=True)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        # c3 [N, 512, H/8, W/8], c4 [N, 1024, H/16, W/16], c5 [N, 2048, H/32, W/32] (sizes rounded up)
        p3, p4, p5 = self.output1(c3), self.output2(c4), self.output3(c5)
        # Upsample to the exact size of the finer level: odd input sizes make it not exactly twice as large.
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]  # each [N, out_channels, h, w]


class SSH(nn.Module):
    """Single-stage-headless context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3, sharing the first) branches.

    The attribute names, mixed case included, are the checkpoint's.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"SSH: out_channels must be a multiple of 4, got {out_channels}")
        half, quarter = out_channels // 2, out_channels // 4
        self.conv3X3 = _conv_bn(in_channels, half, 3, relu=False)
        self.conv5X5_1 = _conv_bn(in_channels, quarter, 3, relu=True)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3, relu=False)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, relu=True)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, C_in, h, w] -> [N, C_out, h, w]
        shared = self.conv5X5_1(x)
        branches = [self.conv3X3(x), self.conv5X5_2(shared), self.conv7x7_3(self.conv7X7_2(shared))]
        return F.relu(torch.cat(branches, dim=1))


class _Head(nn.Module):
    """A 1x1 conv predicting ``values`` numbers per anchor, flattened to [N, h*w*anchors, values]."""

    def __init__(self, in_channels: int, anchors: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, h, w] -> [N, anchors*values, h, w] -> [N, h, w, anchors*values] -> [N, h*w*anchors, values]:
        # row-major over (y, x), then anchors, the order of prior_boxes().
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFaceNet(nn.Module):
    """RetinaFace with a ResNet-50 body; ``state_dict`` keys match retinaface-pytorch's ``RetinaFace``.

    ``forward`` returns (box offsets [N, P, 4], class logits [N, P, 2], landmark offsets [N, P, 10]) with P the
    number of :func:`prior_boxes` for the input size, levels in stride order 8, 16, 32.
    """

    def __init__(self, out_channels: int = 256, anchors: int = 2) -> None:
        super().__init__()
        # weights=None: the released checkpoint holds the trained body, so no ImageNet download (and no warning).
        self.body = IntermediateLayerGetter(resnet50(weights=None), {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
        self.fpn = FPN((512, 1024, 2048), out_channels)
        self.ssh1 = SSH(out_channels, out_channels)
        self.ssh2 = SSH(out_channels, out_channels)
        self.ssh3 = SSH(out_channels, out_channels)
        self.ClassHead = nn.ModuleList(_Head(out_channels, anchors, 2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(out_channels, anchors, 4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(out_channels, anchors, 10) for _ in STEPS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # images [N, 3, H, W], ImageNet-normalised RGB
        c = self.body(images)
        levels = self.fpn(c["c3"], c["c4"], c["c5"])
        features = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)  # [N, P, 4]
        conf = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1)  # [N, P, 2]
        landm = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1)  # [N, P, 10]
        return loc, conf, landm


# ---------------------------------------------------------------------------------------------------------------------
# Priors and decoding


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """The anchors for an input of ``height`` x ``width`` pixels, float32 [P, 4] as (cx, cy, w, h) / (W, H, W, H).

    Per stride s in (8, 16, 32) the feature map is ceil(H/s) x ceil(W/s); anchors go row-major (y, then x), then
    over the level's two sizes, so P = sum_s 2 * ceil(H/s) * ceil(W/s).

    Example:
        >>> prior_boxes(512, 512).shape
        torch.Size([10752, 4])
        >>> prior_boxes(512, 512)[0].tolist()  # top-left cell, 16-px anchor: (4, 4, 16, 16) px / 512
        [0.0078125, 0.0078125, 0.03125, 0.03125]
    """
    parts = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        # float64, then float32 at the end: the reference computes in Python floats, so the values match bit for bit.
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        size = torch.tensor(sizes, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")  # [rows, cols]
        shape = (rows, cols, len(sizes))
        anchors = torch.stack(
            [
                grid_x[..., None].expand(shape),
                grid_y[..., None].expand(shape),
                (size / width).expand(shape),
                (size / height).expand(shape),
            ],
            dim=-1,
        )  # [rows, cols, sizes, 4]
        parts.append(anchors.reshape(-1, 4))
    return torch.cat(parts).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Box offsets [..., P, 4] and priors [P, 4] (cx, cy, w, h) -> corners [..., P, 4] (x1, y1, x2, y2).

    Centre = prior centre + offset * variance[0] * prior size; size = prior size * exp(offset * variance[1]).
    In the priors' normalised units: multiply by (W, H, W, H) for pixels.
    """
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def decode_landmarks(
    pre: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES
) -> torch.Tensor:
    """Landmark offsets [..., P, 10] and priors [P, 4] -> points [..., P, 5, 2] (x, y), in normalised units.

    Each point = prior centre + offset * variance[0] * prior size (``variances[1]`` is unused, as in the reference).
    """
    pre = pre.reshape(*pre.shape[:-1], 5, 2)
    return priors[:, None, :2] + pre * variances[0] * priors[:, None, 2:]


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def hub_checkpoint_path() -> Path:
    """Where torch.hub (and retinaface-pytorch's ``get_model``) keeps the release zip."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RELEASE_FILE


def _where_to_get() -> str:
    return (
        f"download {RELEASE_URL} (MIT-licensed code by ternaus/retinaface, weights trained on WIDER FACE) and put it "
        f"at {hub_checkpoint_path()} or pass --detector-weights PATH"
    )


def _download(destination: Path, timeout: float) -> None:
    """Fetch the release zip to ``destination``; any network failure is a WeightsUnavailableError."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    # download_url_to_file has no timeout argument; urllib honours the socket default for every blocking operation.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(RELEASE_URL, str(destination), progress=False)
    except Exception as exc:  # URLError, HTTPError, timeouts, disk errors: all mean "no weights"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WeightsUnavailableError(
            f"RetinaFace weights: could not download {RELEASE_URL} ({reason}); {_where_to_get()}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def resolve_weights(weights: str | os.PathLike | None, *, allow_download: bool = True, timeout: float = 30.0) -> Path:
    """The weights file to load: ``weights`` itself, else the release zip in the usual places, else downloaded.

    Raises:
        WeightsUnavailableError: ``weights`` does not exist, or nothing was found and downloading is off or failed.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise WeightsUnavailableError(
                f"RetinaFace weights: {path} is a folder; give the {RELEASE_FILE} file (or the .pth in it)"
            )
        if not path.is_file():
            raise WeightsUnavailableError(f"RetinaFace weights not found: {path} does not exist; {_where_to_get()}")
        return path
    candidates = [hub_checkpoint_path(), weights_dir() / RELEASE_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not allow_download:
        raise WeightsUnavailableError(
            f"RetinaFace weights not found: no {RELEASE_FILE} in {candidates[0].parent} or {candidates[1].parent} "
            f"(downloading is off); {_where_to_get()}"
        )
    _download(candidates[0], timeout)
    return candidates[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: the release zip (one member, a torch.save file) or a .pth/.pt file itself.

    Raises:
        WeightsUnavailableError: the file is not readable as either (one line naming the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsUnavailableError(f"{path}: cannot read weights file ({exc.strerror})") from None
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                # torch.save's own format is a zip too (".../data.pkl"): such a file is loaded whole, below.
                if not any(n.endswith("data.pkl") for n in names):
                    if len(names) != 1:
                        raise WeightsUnavailableError(
                            f"{path}: expected a zip with one weights file (like {RELEASE_FILE}), found {len(names)} "
                            "members"
                        )
                    return load_state_dict_bytes(archive.read(names[0]), where=f"{path} (member {names[0]})")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise WeightsUnavailableError(f"{path}: not a readable zip file ({exc})") from None
    return load_state_dict_bytes(data, where=str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Detector


class RetinaFaceDetector(FaceDetector):
    """Batched RetinaFace (ResNet-50) detection; see the module docstring for the pipeline.

    Args:
        network: A :class:`RetinaFaceNet` with weights loaded; it is put in eval mode and moved to ``device``.
        device: Where the network, decoding and NMS run.
        max_size: Longest side of the network input, in pixels (images are up- or down-scaled to it).
        score_threshold: Keep anchors whose face probability is above this (the reference default 0.7).
        nms_iou: IoU above which a lower-scoring box is suppressed.
        top_k: At most this many faces per image, most confident first.
        batch_size: Images per forward pass (only images with the same padded size share one).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (autocast, also on CPU).
            Decoding and NMS always run in fp32.
        pre_nms_top_k: Candidates per image entering NMS, the most confident (bounds NMS cost at low thresholds);
            None for all.
        weights_sha256, weights_source: What :meth:`describe` reports about the weights.
    """

    name = "retinaface"

    def __init__(
        self,
        network: RetinaFaceNet,
        *,
        device: str | torch.device = "cpu",
        max_size: int = 640,
        score_threshold: float = 0.7,
        nms_iou: float = 0.4,
        top_k: int = 750,
        batch_size: int = 16,
        precision: str = "auto",
        pre_nms_top_k: int | None = 5000,
        weights_sha256: str = "",
        weights_source: str = "",
    ) -> None:
        for label, value in (("max_size", max_size), ("top_k", top_k), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"retinaface: {label} must be a positive integer, got {value!r}")
        if pre_nms_top_k is not None and (not isinstance(pre_nms_top_k, int) or pre_nms_top_k < 1):
            raise ConfigError(f"retinaface: pre_nms_top_k must be a positive integer or None, got {pre_nms_top_k!r}")
        for label, value in (("score_threshold", score_threshold), ("nms_iou", nms_iou)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"retinaface: {label} must be in [0, 1], got {value!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"retinaface: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.network = network.eval()
        self.max_size = max_size
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.top_k = top_k
        self.batch_size = batch_size
        self.precision = precision
        self.pre_nms_top_k = pre_nms_top_k
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        self._priors: dict[tuple[int, int], torch.Tensor] = {}
        self.to(device)

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], *, device: str | torch.device = "cpu", where: str = "state dict", **options
    ) -> RetinaFaceDetector:
        """A detector with ``state`` loaded strictly (e.g. random weights in tests, or weights read elsewhere).

        Raises:
            WeightsUnavailableError: ``state`` has missing, unexpected or wrongly shaped keys (named, one line).
        """
        network = RetinaFaceNet()
        load_strict(network, state, where=where, what="RetinaFace ResNet-50")
        return cls(network, device=device, **options)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", **options: Any
    ) -> RetinaFaceDetector:
        """A detector with the weights in ``path`` (release zip or .pth), recording its SHA-256 and path."""
        path = Path(path)
        state = read_state_dict(path)
        return cls.from_state_dict(
            state,
            device=device,
            where=str(path),
            weights_sha256=sha256_file(path),
            weights_source=str(path.resolve()),
            **options,
        )

    def to(self, device: str | torch.device) -> RetinaFaceDetector:
        self.device = torch.device(device)
        # channels_last lets cuDNN pick its faster NHWC kernels; the state dict is unaffected.
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.network.to(self.device, memory_format=memory_format).eval()
        self._priors = {key: value.to(self.device) for key, value in self._priors.items()}
        return self

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "max_size": self.max_size,
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "top_k": self.top_k,
        }

    # -- detection ------------------------------------------------------------------------------------------------

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``image`` resized so its longest side is ``max_size`` (INTER_LINEAR, sides rounded to nearest)."""
        height, width = image.shape[:2]
        scale = self.max_size / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (width, height)
        if size == (width, height):
            return image
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)

    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """One :class:`Faces` per RGB uint8 [H, W, 3] image, boxes clipped to that image, most confident first."""
        self.check_images(images, allow_empty=False)
        resized = [self.resize(image) for image in images]
        # Group by padded size: an image's padding then never depends on its batch neighbours.
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(resized):
            buckets.setdefault(_padded_size(*image.shape[:2]), []).append(index)
        results: list[Faces | None] = [None] * len(images)
        for bucket, indices in buckets.items():
            for chunk in batched(indices, self.batch_size):
                found = self._detect_batch([resized[i] for i in chunk], [images[i].shape[:2] for i in chunk], bucket)
                for i, faces in zip(chunk, found, strict=True):
                    results[i] = faces
        return results  # type: ignore[return-value]  # every index was filled

    def priors(self, height: int, width: int) -> torch.Tensor:
        """:func:`prior_boxes` for a padded input size, cached on the device (a handful of sizes per run)."""
        key = (height, width)
        if key not in self._priors:
            self._priors[key] = prior_boxes(height, width).to(self.device)
        return self._priors[key]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if self.precision == "auto" and self.device.type == "cuda":
            dtype = torch.bfloat16
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def _detect_batch(
        self, resized: list[np.ndarray], original_sizes: list[tuple[int, int]], padded: tuple[int, int]
    ) -> list[Faces]:
        count, (height, width) = len(resized), padded
        canvas = np.zeros((count, height, width, 3), np.uint8)
        valid = torch.zeros((count, 1, height, width), dtype=torch.bool)
        for i, image in enumerate(resized):
            canvas[i, : image.shape[0], : image.shape[1]] = image
            valid[i, :, : image.shape[0], : image.shape[1]] = True
        pixels = torch.from_numpy(canvas).to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [N, 3, H, W]
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # Normalise as float on the device; the pad becomes 0, the ImageNet mean colour (as 0.0.7 padded).
        batch = ((pixels.float() / 255.0 - mean) / std) * valid.to(self.device)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loc, conf, landm = self.network(batch)
        loc, conf, landm = loc.float(), conf.float(), landm.float()  # decode and NMS in fp32

        priors = self.priors(height, width)  # [P, 4]
        scores = F.softmax(conf, dim=-1)[..., 1]  # [N, P]
        to_pixels = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        boxes = decode_boxes(loc, priors) * to_pixels.repeat(2)  # [N, P, 4], network-input pixels
        points = decode_landmarks(landm, priors) * to_pixels  # [N, P, 5, 2]

        if self.pre_nms_top_k is not None and self.pre_nms_top_k < scores.shape[1]:
            # The most confident candidates per image, vectorised: [N, K] scores and prior indices.
            top_scores, top_priors = scores.topk(self.pre_nms_top_k, dim=1)
            keep = top_scores > self.score_threshold
            image_index = torch.arange(count, device=self.device)[:, None].expand_as(top_priors)[keep]
            prior_index = top_priors[keep]
        else:
            image_index, prior_index = torch.nonzero(scores > self.score_threshold, as_tuple=True)
        cand_boxes = boxes[image_index, prior_index]  # [M, 4]
        cand_scores = scores[image_index, prior_index]  # [M]
        cand_points = points[image_index, prior_index]  # [M, 5, 2]

        # One call does every image's NMS (the image index is the category); kept indices come by score, descending.
        # In float64: batched_nms may shift each image's boxes by index * (largest coordinate + 1), and in float32
        # that shift would cost IoU precision, so a borderline suppression could depend on the batch.
        kept = batched_nms(cand_boxes.double(), cand_scores.double(), image_index, self.nms_iou)
        cand_boxes, cand_scores, cand_points, image_index = (
            cand_boxes[kept],
            cand_scores[kept],
            cand_points[kept],
            image_index[kept],
        )

        # Back to original pixels with each image's per-axis factor (what cv2.resize used), then clip to the image.
        sizes = torch.tensor(original_sizes, dtype=torch.float32, device=self.device)  # [N, 2] (h, w)
        resized_sizes = torch.tensor([im.shape[:2] for im in resized], dtype=torch.float32, device=self.device)
        factor = (sizes / resized_sizes).flip(-1)[image_index]  # [M, 2] (x, y)
        limits = sizes.flip(-1)[image_index]  # [M, 2] (W, H)
        cand_points = cand_points * factor[:, None, :]
        cand_boxes = cand_boxes * factor.repeat(1, 2)
        cand_boxes = torch.minimum(cand_boxes.clamp(min=0), limits.repeat(1, 2))
        # A box wholly outside its image clips to zero area: it is not a face in the image.
        inside = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])

        boxes_np = cand_boxes[inside].cpu().numpy()
        scores_np = cand_scores[inside].cpu().numpy()
        points_np = cand_points[inside].cpu().numpy()
        index_np = image_index[inside].cpu().numpy()
        out = []
        for i in range(count):
            mine = np.flatnonzero(index_np == i)[: self.top_k]
            out.append(Faces(boxes_np[mine], scores_np[mine], points_np[mine]))
        return out


def _padded_size(height: int, width: int) -> tuple[int, int]:
    """A resized image's network input size: each side rounded up to a multiple of 32."""
    return (-(-height // PAD_MULTIPLE) * PAD_MULTIPLE, -(-width // PAD_MULTIPLE) * PAD_MULTIPLE)


def create_retinaface(
    *,
    weights: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
    download_timeout: float = 30.0,
    **options: Any,
) -> RetinaFaceDetector:
    """The registered factory: RetinaFace ResNet-50 with the released weights on ``device``.

    Args:
        weights: The release zip (``retinaface_resnet50_2020-07-20-f168fae3c.zip``) or an extracted .pth/.pt.
            None looks for the zip in torch's hub checkpoints folder and in ``weights_dir()``, then downloads it into
            the hub folder unless ``allow_download`` is False.
        download_timeout: Seconds any one network operation may wait during the download.
        options: :class:`RetinaFaceDetector`'s settings (``max_size``, ``score_threshold``, ``nms_iou``, ``top_k``,
            ``batch_size``, ``precision``, ``pre_nms_top_k``).

    Raises:
        WeightsUnavailableError: missing, undownloadable, corrupt or foreign weights (one line, with the remedy).
    """
    path = resolve_weights(weights, allow_download=allow_download, timeout=download_timeout)
    return RetinaFaceDetector.from_file(path, device=device, **options)


def identify_weights(weights: str | os.PathLike | None) -> tuple[str, str]:
    """(SHA-256, path) of the weights ``create_retinaface`` would load (downloading them if it would)."""
    path = resolve_weights(weights)
    return sha256_file(path), str(Path(path).resolve())


DETECTORS.register("retinaface", create_retinaface)
WEIGHT_IDENTITIES.register("retinaface", identify_weights)
