"""SynthFER: a procedurally rendered facial-expression benchmark whose ground truth is known exactly.

Each image is a parametric face drawn with OpenCV (anti-aliased, sub-pixel coordinates). Its expression is a set of
FACS action units (AUs) combined by the EMFACS prototypes, each AU with a sampled intensity, so that low-intensity
faces are genuinely ambiguous as in real data. On top come nuisances (in-plane rotation, scale, translation, mild
yaw, lighting gradient, blur, noise, cluttered backgrounds), group attributes used as demographic stand-ins (skin
tone, hair style, age cue, glasses), optional occluders with a per-pixel mask, and optional training-label noise.

Ground truth kept per image: the 68 landmarks in iBUG-300W order, every AU intensity, a per-AU region mask (on a grid
of ``size // 4``), the occlusion mask (full size), the attributes and the clean label.

On disk (``generate_synthfer(out=DIR)``)::

    DIR/images/<split>/<image_id>.png   RGB PNG, size x size
    DIR/manifest.parquet                 one row per image, columns in MANIFEST_COLUMNS below
    DIR/masks.npz                        occlusion (N, size*size/8) and au_regions (N, n_AU, grid*grid/8), bit-packed
    DIR/synthfer.yaml                    the generation parameters, counts and a column description

The same parameters and seed give byte-identical files: every image has its own RNG seeded by (seed, split, index),
so the output does not depend on the number of worker processes either.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from fer_bench.data._registry import register_dataset
from fer_bench.data.labels import get_label_space
from fer_bench.data.manifest import DatasetInfo
from fer_bench.errors import ConfigError, DataError

#: The action units SynthFER renders, in the order of the ``au_intensity`` column and the ``au_regions`` masks.
ACTION_UNITS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 25, 26)

#: EMFACS prototypes: expression -> alternative AU sets (one is sampled). Contempt is unilateral.
PROTOTYPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "neutral": ((),),
    "happiness": ((6, 12),),
    "sadness": ((1, 4, 15),),
    "surprise": ((1, 2, 5, 26),),
    "fear": ((1, 2, 4, 5, 7, 20, 26),),
    "disgust": ((9, 15, 16), (10,)),
    "anger": ((4, 5, 7, 23),),
    "contempt": ((12, 14),),
}

SKIN_TONES: tuple[str, ...] = ("I", "II", "III", "IV", "V", "VI")
# BGR-free: we render in RGB. Six tones from light to dark (roughly Fitzpatrick-like).
_SKIN_RGB = np.array(
    [[246, 222, 204], [234, 196, 165], [212, 165, 125], [176, 124, 86], [131, 86, 56], [84, 56, 40]], dtype=np.float32
)
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bald", "curly")
AGE_GROUPS: tuple[str, ...] = ("young", "old")
OCCLUDERS: tuple[str, ...] = ("sunglasses", "mouth_mask", "hand", "scarf", "block")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Manifest columns written by SynthFER (beyond the standard ones, see ``fer_bench.data.manifest``).
MANIFEST_COLUMNS: dict[str, str] = {
    "image_id": "unique id, e.g. train_000042",
    "path": "PNG path relative to the dataset root",
    "split": "train | val | test",
    "label": "index into the label space (noisy for train when label_noise > 0)",
    "clean_label": "the label actually rendered",
    "expression": "name of the clean label",
    "intensity": "sampled expression intensity in [0, 1] (0 for neutral)",
    "landmarks": "68 iBUG-300W points as a flat list x0, y0, x1, y1, ... in pixels",
    "bbox": "face box x0, y0, x1, y1 in pixels",
    "au_intensity": "intensity of each AU in ACTION_UNITS order",
    "skin_tone": "group: I..VI",
    "hair": "group: short | long | bald | curly",
    "age": "group: young | old (wrinkle lines)",
    "glasses": "group: yes | no",
    "occluded": "subset: an occluder covers part of the face",
    "occluder": "none | sunglasses | mouth_mask | hand | scarf | block",
    "low_intensity": "subset: a non-neutral expression with intensity < 0.3",
    "mask_index": "row in masks.npz",
}
GROUP_COLUMNS: tuple[str, ...] = ("skin_tone", "hair", "age", "glasses")
SUBSET_COLUMNS: tuple[str, ...] = ("occluded", "low_intensity")

# Confusable partner per expression for class-dependent label noise.
_CONFUSABLE = {
    "neutral": "sadness",
    "happiness": "contempt",
    "sadness": "neutral",
    "surprise": "fear",
    "fear": "surprise",
    "disgust": "anger",
    "anger": "disgust",
    "contempt": "happiness",
}


@dataclass(frozen=True)
class SynthFERConfig:
    """Generation parameters. Every field is written to ``synthfer.yaml``.

    Attributes:
        seed: Master seed; image i of split s uses the RNG seeded by (seed, s, i).
        size: Image side in pixels.
        n_train, n_val, n_test: Images per split (classes balanced in expectation).
        label_space: ``all8`` or ``basic7``.
        min_intensity: Lower end of the uniform expression intensity; low values make classes overlap.
        occlusion_fraction: Fraction of images (every split) that get an occluder.
        label_noise: Fraction of *training* labels flipped; the rendered label stays in ``clean_label``.
        noise_type: ``symmetric`` (uniform over other classes) or ``class_dependent`` (to a confusable class).
        skin_tone_weights: Proportions of the six skin tones.
        glasses_fraction: Fraction of faces with glasses.
        old_fraction: Fraction of faces with the age cue.
        bias: Label-group correlation injected into the *training* split: with this probability the skin tone is
            tied to the label (tone = label mod 6), so a model can learn a shortcut that fails on val/test.
    """

    seed: int = 0
    size: int = 112
    n_train: int = 6000
    n_val: int = 1000
    n_test: int = 2000
    label_space: str = "all8"
    min_intensity: float = 0.1
    occlusion_fraction: float = 0.15
    label_noise: float = 0.0
    noise_type: str = "symmetric"
    skin_tone_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    glasses_fraction: float = 0.2
    old_fraction: float = 0.3
    bias: float = 0.0
    version: int = field(default=1)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"synthfer {name}: expected {expected}, got {getattr(self, name)!r}")

        if self.size < 32 or self.size % 8:
            raise bad("size", "a multiple of 8, at least 32")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise bad(name, "a non-negative count")
        if self.label_space not in ("all8", "basic7"):
            raise bad("label_space", "'all8' or 'basic7'")
        for name in ("min_intensity", "occlusion_fraction", "label_noise", "glasses_fraction", "old_fraction", "bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "a number in [0, 1]")
        if self.noise_type not in ("symmetric", "class_dependent"):
            raise bad("noise_type", "'symmetric' or 'class_dependent'")
        weights = np.asarray(self.skin_tone_weights, dtype=float)
        if weights.shape != (6,) or (weights < 0).any() or weights.sum() <= 0:
            raise bad("skin_tone_weights", "six non-negative numbers, not all zero")


# --------------------------------------------------------------------------------------------------------------------
# Geometry: a neutral face as 68 iBUG points, AU deformations, and the pose transform.
# Coordinates are fractions of the image side until the pose transform turns them into pixels.


@dataclass
class _Identity:
    face_w: float
    face_h: float
    eye_y: float
    eye_dx: float
    eye_w: float
    brow_gap: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    upper_lip: float
    lower_lip: float


_IDENTITY_RANGES: dict[str, tuple[float, float]] = {
    "face_w": (0.29, 0.34),
    "face_h": (0.37, 0.42),
    "eye_y": (0.44, 0.47),
    "eye_dx": (0.115, 0.135),
    "eye_w": (0.052, 0.064),
    "brow_gap": (0.05, 0.065),
    "nose_y": (0.585, 0.615),
    "nose_w": (0.9, 1.15),
    "mouth_y": (0.69, 0.72),
    "mouth_w": (0.09, 0.11),
    "upper_lip": (0.016, 0.024),
    "lower_lip": (0.02, 0.03),
}


def _sample_identity(rng: np.random.Generator) -> _Identity:
    return _Identity(**{name: rng.uniform(lo, hi) for name, (lo, hi) in _IDENTITY_RANGES.items()})


def _face_landmarks(ident: _Identity, au: dict[int, float], contempt_side: int) -> np.ndarray:
    """68 iBUG points (fractions of the image side) of ``ident`` showing the AU intensities ``au``.

    Image left is the subject's right, as in iBUG-300W: point 0 is the jaw at image left, 36-41 the eye at image left.
    """
    a = au.get
    cx, cy = 0.5, 0.5
    pts = np.zeros((68, 2), dtype=np.float64)

    # Jaw 0..16 on the lower half of the face ellipse; AU26 drops the chin, AU17 raises it.
    jaw_drop = 0.06 * a(26, 0.0) - 0.015 * a(17, 0.0)
    for i in range(17):
        theta = math.pi + 0.12 - i * (math.pi + 0.24) / 16
        weight = max(0.0, math.sin(theta))  # 1 at the chin, 0 at the temples
        pts[i] = (cx + ident.face_w * math.cos(theta), cy + ident.face_h * math.sin(theta) + jaw_drop * weight**2)

    # Eyes 36..41 (image left) and 42..47 (image right).
    upper = 0.021 * (1 + 1.2 * a(5, 0.0)) * (1 - 0.25 * a(7, 0.0)) * (1 - 0.15 * a(6, 0.0))
    lower = 0.016 * (1 - 0.55 * a(7, 0.0)) * (1 - 0.45 * a(6, 0.0))
    for side, first in ((-1, 36), (1, 42)):
        ex = cx + side * ident.eye_dx
        ey = ident.eye_y
        w = ident.eye_w
        # Order: outer/inner corner, two upper points, other corner, two lower points (iBUG goes clockwise in image).
        xs = np.array([-w, -0.35 * w, 0.35 * w, w, 0.35 * w, -0.35 * w])
        ys = np.array([0.0, -upper, -upper, 0.0, lower, lower])
        pts[first : first + 6] = np.stack([ex + xs, ey + ys], axis=1)

    # Brows 17..21 (image left, outer to inner) and 22..26 (image right, inner to outer).
    for side, first in ((-1, 17), (1, 22)):
        ex = cx + side * ident.eye_dx
        base = ident.eye_y - ident.brow_gap
        for k in range(5):
            t = k / 4  # 0 outer .. 1 inner
            inner = t if side < 0 else 1 - t
            offset = (-1.25 + 2.25 * t) * ident.eye_w if side < 0 else (-1.0 + 2.25 * t) * ident.eye_w
            x = ex + offset
            y = base - 0.012 * math.sin(math.pi * (0.15 + 0.7 * t))
            y -= 0.045 * a(1, 0.0) * inner**1.5  # inner brow raiser
            y -= 0.04 * a(2, 0.0) * (1 - inner) ** 1.2  # outer brow raiser
            y += 0.03 * a(4, 0.0) * (0.4 + 0.6 * inner)  # brow lowerer
            y += 0.010 * a(9, 0.0) * inner  # nose wrinkler pulls the inner brow down a little
            x -= side * 0.02 * a(4, 0.0) * inner  # ... and AU4 draws the brows together
            pts[first + k] = (x, y)

    # Nose bridge 27..30 and base 31..35; AU9 lifts the wings, AU10 a little.
    nose_lift = 0.02 * a(9, 0.0) + 0.006 * a(10, 0.0)
    for k in range(4):
        pts[27 + k] = (cx, ident.eye_y - 0.01 + k * (ident.nose_y - 0.02 - ident.eye_y + 0.01) / 3)
    for k, (dx, dy) in enumerate(((-0.045, 0.0), (-0.022, 0.008), (0.0, 0.012), (0.022, 0.008), (0.045, 0.0))):
        pts[31 + k] = (cx + dx * ident.nose_w, ident.nose_y + dy - nose_lift * (1.0 if dx else 0.5))

    # Mouth: corners, lip thickness and opening from the mouth AUs.
    mw = ident.mouth_w * (1 + 0.4 * a(20, 0.0) - 0.3 * a(23, 0.0) + 0.15 * a(12, 0.0) * (contempt_side == 0))
    ul = ident.upper_lip * (1 - 0.3 * a(20, 0.0) - 0.4 * a(23, 0.0))
    ll = ident.lower_lip * (1 - 0.3 * a(20, 0.0) - 0.4 * a(23, 0.0))
    my = ident.mouth_y
    gap = 0.02 * a(25, 0.0) + 0.06 * a(26, 0.0) + 0.012 * a(16, 0.0) + 0.01 * a(10, 0.0)
    upper_raise = 0.03 * a(10, 0.0)
    lower_shift = 0.025 * a(16, 0.0) - 0.01 * a(17, 0.0)
    # Corner lift per side (-1 image left, +1 image right): AU12 up and out, AU15 down, AU14 in.
    corner = {}
    for side in (-1, 1):
        on_side = contempt_side == 0 or contempt_side == side
        lift = 0.05 * a(12, 0.0) * on_side - 0.045 * a(15, 0.0)
        out = 0.02 * a(12, 0.0) * on_side - 0.015 * a(14, 0.0) * on_side
        corner[side] = (lift, out)

    def mouth_point(u: float, v: float, lip: str) -> tuple[float, float]:
        """u in [-1, 1] across the mouth; v the vertical offset before corner lift."""
        side = -1 if u < 0 else 1
        lift, out = corner[side]
        reach = abs(u) ** 2  # corners move fully, the middle not at all
        x = cx + u * mw + side * out * reach
        y = my + v - lift * reach
        if lip == "upper":
            y -= upper_raise * (1 - 0.6 * reach)
        elif lip == "lower":
            y += lower_shift * (1 - 0.6 * reach) + 0.010 * a(12, 0.0) * (1 - reach) * (contempt_side == 0)
        return x, y

    half = gap / 2
    outer = [
        mouth_point(-1.0, 0.0, "corner"),
        mouth_point(-0.6, -half - 0.6 * ul, "upper"),
        mouth_point(-0.25, -half - ul, "upper"),
        mouth_point(0.0, -half - 0.85 * ul, "upper"),
        mouth_point(0.25, -half - ul, "upper"),
        mouth_point(0.6, -half - 0.6 * ul, "upper"),
        mouth_point(1.0, 0.0, "corner"),
        mouth_point(0.6, half + 0.8 * ll, "lower"),
        mouth_point(0.25, half + ll, "lower"),
        mouth_point(0.0, half + ll, "lower"),
        mouth_point(-0.25, half + ll, "lower"),
        mouth_point(-0.6, half + 0.8 * ll, "lower"),
    ]
    inner = [
        mouth_point(-0.82, 0.0, "corner"),
        mouth_point(-0.35, -half, "upper"),
        mouth_point(0.0, -half, "upper"),
        mouth_point(0.35, -half, "upper"),
        mouth_point(0.82, 0.0, "corner"),
        mouth_point(0.35, half, "lower"),
        mouth_point(0.0, half, "lower"),
        mouth_point(-0.35, half, "lower"),
    ]
    pts[48:60] = outer
    pts[60:68] = inner
    return pts


def _pose_matrix(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A 2x3 similarity (rotation, scale, translation) from face fractions to pixels, and a yaw in [-1, 1]."""
    angle = float(np.clip(rng.normal(0, 8), -20, 20))
    scale = rng.uniform(0.88, 1.08) * size
    tx, ty = rng.uniform(-0.05, 0.05, size=2) * size
    rad = math.radians(angle)
    c, s = math.cos(rad) * scale, math.sin(rad) * scale
    centre = size / 2
    # Rotate about the face centre (0.5, 0.5), then move it to the image centre plus the shift.
    m = np.array([[c, -s, centre + tx - 0.5 * (c - s)], [s, c, centre + ty - 0.5 * (s + c)]])
    yaw = float(np.clip(rng.normal(0, 0.35), -0.8, 0.8))
    return m, yaw


# Relative depth of each landmark (nose tip forward, jaw edges back) for the yaw approximation.
_DEPTH = np.zeros(68)
_DEPTH[0:17] = -np.abs(np.linspace(-1, 1, 17)) * 0.6
_DEPTH[27:31] = np.linspace(0.4, 1.0, 4)
_DEPTH[31:36] = 0.6
_DEPTH[48:68] = 0.35
_DEPTH[36:48] = 0.1
_DEPTH[17:27] = 0.15


def _apply_yaw(points: np.ndarray, yaw: float, depth: np.ndarray) -> np.ndarray:
    """Mild yaw: points move sideways in proportion to their depth (a weak-perspective turn)."""
    out = points.copy()
    out[:, 0] += yaw * 0.035 * depth
    return out


def _to_pixels(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    return points @ m[:, :2].T + m[:, 2]


# --------------------------------------------------------------------------------------------------------------------
# Drawing helpers. Coordinates are float pixels; OpenCV gets them in fixed point (``_SHIFT`` fractional bits).

_SHIFT = 4
_ONE = 1 << _SHIFT


def _fx(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points) * _ONE).astype(np.int32)


def _poly(img: np.ndarray, points: np.ndarray, color, closed: bool = True, thickness: int = -1) -> None:
    p = _fx(points).reshape(-1, 1, 2)
    if thickness < 0:
        cv2.fillPoly(img, [p], color, lineType=cv2.LINE_AA, shift=_SHIFT)
    else:
        cv2.polylines(img, [p], closed, color, thickness, lineType=cv2.LINE_AA, shift=_SHIFT)


def _ellipse(img: np.ndarray, centre, axes, angle: float, color, thickness: int = -1) -> None:
    c = tuple(int(v) for v in _fx(centre))
    ax = tuple(max(1, int(v)) for v in _fx(axes))
    cv2.ellipse(img, c, ax, angle, 0, 360, color, thickness, lineType=cv2.LINE_AA, shift=_SHIFT)


def _mix(a, b, t: float) -> tuple[float, ...]:
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b, strict=True))


def _curve(p0, p1, p2, n: int = 12) -> np.ndarray:
    """Quadratic Bezier through control points, as an (n, 2) polyline."""
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered background: a colour gradient plus random rectangles, circles and lines."""
    c0, c1 = rng.uniform(30, 230, size=(2, 3))
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    direction = rng.integers(2)
    t = ramp[None, :, None] if direction == 0 else ramp[:, None, None]
    img = np.broadcast_to(c0 * (1 - t) + c1 * t, (size, size, 3)).astype(np.float32).copy()
    for _ in range(int(rng.integers(6, 14))):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.04, 0.25) * size
        if kind == 0:
            w, h = rng.uniform(0.05, 0.4, 2) * size
            box = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
            _poly(img, box, color)
        elif kind == 1:
            _ellipse(img, (x, y), (r, r * rng.uniform(0.5, 1.0)), float(rng.uniform(0, 180)), color)
        else:
            x2, y2 = rng.uniform(0, size, 2)
            _poly(img, np.array([[x, y], [x2, y2]]), color, closed=False, thickness=int(rng.integers(1, 4)))
    return img


@dataclass
class _Attributes:
    skin_tone: int
    hair: int
    old: bool
    glasses: bool
    hair_rgb: tuple[float, float, float]
    iris_rgb: tuple[float, float, float]
    lip_rgb: tuple[float, float, float]


def _render_face(
    img: np.ndarray,
    lm: np.ndarray,
    head: np.ndarray,
    attrs: _Attributes,
    au: dict[int, float],
    contempt_side: int,
    size: int,
) -> None:
    """Draw the face with landmarks ``lm`` (pixels) and head outline ``head`` (pixels) onto ``img`` in place."""
    skin = tuple(float(v) for v in _SKIN_RGB[attrs.skin_tone])
    dark_skin = _mix(skin, (40, 25, 20), 0.45)
    line_w = max(1, round(size / 90))
    a = au.get
    centre = head.mean(axis=0)
    face_w = np.linalg.norm(lm[16] - lm[0])
    up = lm[27] - lm[8]
    up = up / (np.linalg.norm(up) + 1e-9)  # face "up" direction in the image
    right = np.array([-up[1], up[0]]) * -1  # towards image right for an upright face
    angle = math.degrees(math.atan2(right[1], right[0]))

    # Long hair behind the head, neck, ears, face.
    if attrs.hair == 1:
        _ellipse(img, centre + up * 0.02 * size, (face_w * 0.68, face_w * 0.85), angle, attrs.hair_rgb)
    neck = np.array(
        [lm[5] - up * 0.02 * size, lm[11] - up * 0.02 * size, lm[11] - up * 0.35 * size, lm[5] - up * 0.35 * size]
    )
    _poly(img, neck, _mix(skin, (0, 0, 0), 0.12))
    for i in (1, 15):
        _ellipse(img, lm[i] + (lm[i] - centre) * 0.08, (0.035 * size, 0.06 * size), angle, _mix(skin, (0, 0, 0), 0.08))
    _poly(img, head, skin)

    # Hair on top: the top arc of the head outline, closed by a hairline above the brows.
    top = head[17:]
    hairline = (lm[19] + lm[24]) / 2 + up * 0.11 * size
    if attrs.hair in (0, 1):  # short or long: a cap; long adds a lower fringe line
        drop = 0.02 if attrs.hair == 0 else 0.045
        cap = np.vstack([top[5:-5], _curve(top[-6], hairline - up * drop * size, top[5])])
        _poly(img, cap, attrs.hair_rgb)
    elif attrs.hair == 3:  # curly: circles along the top
        for p in top[2:-2:2]:
            _ellipse(img, p - up * 0.005 * size, (0.05 * size, 0.05 * size), 0, attrs.hair_rgb)

    # Age cue: forehead lines and under-eye bags.
    if attrs.old:
        for k in range(3):
            mid = (lm[19] + lm[24]) / 2 + up * (0.05 + 0.025 * k) * size
            half = right * face_w * (0.22 - 0.03 * k)
            _poly(
                img,
                _curve(mid - half, mid + up * 0.008 * size, mid + half),
                _mix(skin, (60, 40, 30), 0.45),
                closed=False,
                thickness=1,
            )
        for first in (36, 42):
            bag = _curve(
                lm[first] - up * 0.012 * size,
                (lm[first + 4] + lm[first + 5]) / 2 - up * 0.03 * size,
                lm[first + 3] - up * 0.012 * size,
            )
            _poly(img, bag, _mix(skin, (60, 40, 30), 0.35), closed=False, thickness=1)

    # Expression textures, each drawn with a strength equal to its AU intensity.
    def crease(points: np.ndarray, strength: float, thickness: int = max(1, round(size / 56))) -> None:
        if strength > 0.05:
            _poly(img, points, _mix(skin, (50, 30, 25), min(0.85, strength)), closed=False, thickness=thickness)

    brow_mid = (lm[21] + lm[22]) / 2
    for dx in (-0.018, 0.018):  # AU4: vertical furrows between the brows
        p = brow_mid + right * dx * size
        crease(np.array([p + up * 0.005 * size, p - up * 0.035 * size]), a(4, 0.0))
    for k in range(3):  # AU9: horizontal wrinkles on the nose bridge
        p = lm[27] + (lm[28] - lm[27]) * (0.4 + 0.4 * k)
        crease(np.array([p - right * 0.018 * size, p + right * 0.018 * size]), a(9, 0.0))
    for side, corner, wing in ((-1, 48, 31), (1, 54, 35)):  # AU12/AU10: nasolabial folds
        strength = max(a(10, 0.0), a(12, 0.0) * (contempt_side in (0, side)))
        start = lm[wing] + right * side * 0.02 * size
        end = lm[corner] + right * side * 0.02 * size - up * 0.01 * size
        crease(_curve(start, (start + end) / 2 + right * side * 0.025 * size, end), strength * 0.8)
    for first, side in ((36, -1), (42, 1)):  # AU6: cheek raise lines below the eyes and crow's feet
        lower_mid = (lm[first + 4] + lm[first + 5]) / 2
        crease(
            _curve(lm[first] - up * 0.02 * size, lower_mid - up * 0.035 * size, lm[first + 3] - up * 0.02 * size),
            a(6, 0.0),
        )
        outer = lm[36] if side < 0 else lm[45]
        for k in (-1, 0, 1):
            d = right * side * 0.03 * size + up * k * 0.012 * size
            crease(np.array([outer + right * side * 0.01 * size, outer + d]), a(6, 0.0) * 0.8)
    for side, corner in ((-1, 48), (1, 54)):  # AU14: dimples
        p = lm[corner] + right * side * 0.018 * size
        crease(np.array([p + up * 0.012 * size, p - up * 0.012 * size]), a(14, 0.0) * (contempt_side in (0, side)))
    chin = (lm[8] + lm[57]) / 2  # AU17: chin boss dimples
    for dx in (-0.012, 0.0, 0.012):
        crease(np.array([chin + right * dx * size, chin + right * dx * size + up * 0.004 * size]), a(17, 0.0), 2)

    # Brows.
    for first in (17, 22):
        _poly(
            img,
            lm[first : first + 5],
            attrs.hair_rgb if attrs.hair != 2 else (70, 55, 45),
            closed=False,
            thickness=max(2, round(size / 40)),
        )

    # Eyes: sclera, iris clipped to the eye opening, then the lid lines.
    for first in (36, 42):
        eye = lm[first : first + 6]
        eye_mask = np.zeros(img.shape[:2], np.uint8)
        _poly(eye_mask, eye, 255)
        layer = img.copy()
        _poly(layer, eye, (235, 235, 230))
        centre_eye = eye.mean(axis=0)
        r = np.linalg.norm(eye[3] - eye[0]) * 0.22
        _ellipse(layer, centre_eye, (r, r), 0, attrs.iris_rgb)
        _ellipse(layer, centre_eye, (r * 0.45, r * 0.45), 0, (15, 15, 15))
        alpha = (eye_mask.astype(np.float32) / 255.0)[..., None]
        img[:] = img * (1 - alpha) + layer * alpha
        _poly(img, eye[[0, 1, 2, 3]], (30, 25, 25), closed=False, thickness=line_w)
        _poly(img, eye[[3, 4, 5, 0]], dark_skin, closed=False, thickness=1)

    # Nose: bridge side line and base.
    _poly(img, lm[[28, 29, 30]] + right * 0.012 * size, _mix(skin, (40, 25, 20), 0.3), closed=False, thickness=1)
    _poly(img, lm[31:36], dark_skin, closed=False, thickness=line_w)
    for i in (32, 34):
        _ellipse(img, lm[i], (0.008 * size, 0.005 * size), angle, _mix(skin, (20, 10, 10), 0.6))

    # Mouth: cavity and teeth when open, then the lips.
    inner = lm[60:68]
    if np.linalg.norm(lm[66] - lm[62]) > 0.004 * size:
        _poly(img, inner, (45, 15, 20))
        teeth_strength = max(a(10, 0.0), a(12, 0.0), a(16, 0.0), a(20, 0.0))
        if teeth_strength > 0.2:
            teeth = np.vstack([inner[[0, 1, 2, 3, 4]], inner[[4, 3, 2, 1, 0]] + up * -0.012 * size])
            _poly(img, teeth, (240, 238, 228))
    outer = lm[48:60]
    upper_lip = np.vstack([outer[0:7], inner[[4, 3, 2, 1, 0]]])
    lower_lip = np.vstack([outer[[6, 7, 8, 9, 10, 11, 0]], inner[[0, 7, 6, 5, 4]]])
    lip = _mix(attrs.lip_rgb, skin, 0.35 if attrs.skin_tone > 3 else 0.0)
    _poly(img, upper_lip, _mix(lip, (0, 0, 0), 0.1))
    _poly(img, lower_lip, lip)
    _poly(img, inner[[0, 1, 2, 3, 4]], (70, 30, 35), closed=False, thickness=1)

    if attrs.glasses:
        for first in (36, 42):
            c = lm[first : first + 6].mean(axis=0)
            _ellipse(img, c, (0.07 * size, 0.05 * size), angle, (25, 25, 30), max(1, round(size / 60)))
        _poly(
            img,
            np.array([lm[39] + right * 0.012 * size, lm[42] - right * 0.012 * size]),
            (25, 25, 30),
            closed=False,
            thickness=max(1, round(size / 60)),
        )


def _draw_occluder(
    img: np.ndarray, mask: np.ndarray, kind: str, lm: np.ndarray, rng: np.random.Generator, size: int
) -> None:
    """Draw an occluder on ``img`` and the same shape (value 1) on ``mask``."""
    color = tuple(float(v) for v in rng.uniform(0, 255, 3))
    shapes: list[tuple[str, tuple]] = []
    up = lm[27] - lm[8]
    up = up / (np.linalg.norm(up) + 1e-9)
    right = -np.array([-up[1], up[0]])
    angle = math.degrees(math.atan2(right[1], right[0]))
    if kind == "sunglasses":
        color = (20, 20, 25)
        for first in (36, 42):
            c = lm[first : first + 6].mean(axis=0)
            shapes.append(("ellipse", (c, (0.085 * size, 0.06 * size), angle)))
        shapes.append(("line", (np.array([lm[39], lm[42]]), max(2, size // 40))))
    elif kind == "mouth_mask":
        color = _mix((200, 215, 235), color, 0.2)
        top = lm[29]
        poly = np.array(
            [
                lm[1] + up * 0.0,
                top - right * 0.12 * size,
                top + right * 0.12 * size,
                lm[15],
                lm[12],
                lm[8] - up * 0.01 * size,
                lm[4],
            ]
        )
        shapes.append(("poly", (poly,)))
    elif kind == "hand":
        color = tuple(float(v) for v in _SKIN_RGB[int(rng.integers(6))])
        target = lm[int(rng.choice([30, 57, 40, 47, 8]))] + rng.normal(0, 0.03, 2) * size
        shapes.append(("ellipse", (target, (0.13 * size, 0.10 * size), float(rng.uniform(0, 180)))))
        for k in range(4):
            base = target + right * (k - 1.5) * 0.05 * size
            tip = base + up * 0.18 * size + right * rng.normal(0, 0.02) * size
            shapes.append(("line", (np.array([base, tip]), max(2, size // 22))))
    elif kind == "scarf":
        y0 = lm[57] + up * 0.01 * size
        poly = np.array(
            [
                y0 - right * 0.5 * size,
                y0 + right * 0.5 * size,
                y0 + right * 0.5 * size - up * 0.4 * size,
                y0 - right * 0.5 * size - up * 0.4 * size,
            ]
        )
        shapes.append(("poly", (poly,)))
    else:  # block
        w, h = rng.uniform(0.2, 0.45, 2) * size
        c = lm[int(rng.integers(68))]
        poly = np.array([c, c + (w, 0), c + (w, h), c + (0, h)]) - (w / 2, h / 2)
        shapes.append(("poly", (poly,)))
    for target, value in ((img, color), (mask, 1)):
        for name, args in shapes:
            if name == "ellipse":
                _ellipse(target, args[0], args[1], args[2], value)
            elif name == "line":
                _poly(target, args[0], value, closed=False, thickness=int(args[1]))
            else:
                _poly(target, args[0], value)


# Landmarks each AU moves, for its ground-truth region (plus a margin).
_AU_LANDMARKS: dict[int, tuple[int, ...]] = {
    1: (19, 20, 21, 22, 23, 24),
    2: (17, 18, 19, 24, 25, 26),
    4: (19, 20, 21, 22, 23, 24, 27),
    5: (36, 37, 38, 39, 42, 43, 44, 45),
    6: (36, 39, 40, 41, 42, 45, 46, 47, 31, 35),
    7: (36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47),
    9: (21, 22, 27, 28, 29, 30, 31, 35),
    10: (31, 35, 48, 49, 50, 51, 52, 53, 54),
    12: (31, 35, 48, 54, 49, 53, 59, 55),
    14: (48, 54, 49, 53, 59, 55),
    15: (48, 54, 49, 53, 59, 55, 6, 10),
    16: (55, 56, 57, 58, 59, 65, 66, 67, 7, 8, 9),
    17: (56, 57, 58, 7, 8, 9),
    20: (48, 54, 49, 53, 55, 59, 5, 11),
    23: tuple(range(48, 60)),
    25: tuple(range(48, 68)),
    26: tuple(range(48, 68)) + (6, 7, 8, 9, 10),
}


def _au_region_masks(lm: np.ndarray, grid: int, size: int, contempt_side: int, centre_x: float) -> np.ndarray:
    """(n_AU, grid, grid) uint8 region masks: convex hull of the landmarks each AU moves, dilated by a margin."""
    scale = grid / size
    out = np.zeros((len(ACTION_UNITS), grid, grid), np.uint8)
    margin = max(1, round(0.03 * grid))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    for k, au in enumerate(ACTION_UNITS):
        pts = lm[list(_AU_LANDMARKS[au])]
        if au in (12, 14) and contempt_side != 0:  # unilateral: keep the points on the active side
            keep = (pts[:, 0] < centre_x) if contempt_side < 0 else (pts[:, 0] >= centre_x)
            pts = pts[keep] if keep.any() else pts
        hull = cv2.convexHull(_fx(pts * scale).reshape(-1, 1, 2))
        cv2.fillConvexPoly(out[k], hull, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        out[k] = cv2.dilate(out[k], kernel)
    return out


def _render_one(config: SynthFERConfig, split_index: int, index: int, label_names: tuple[str, ...]):
    """Render image ``index`` of split ``split_index``: returns (rgb uint8, record dict, occlusion, au regions)."""
    rng = np.random.default_rng([config.seed, split_index, index, 0x5F3C])
    size = config.size
    split = SPLITS[split_index]
    n_classes = len(label_names)
    label = int(rng.integers(n_classes))
    expression = label_names[label]

    # Expression: a prototype AU set at a sampled intensity, each AU jittered, plus small idiosyncratic AUs.
    prototypes = PROTOTYPES[expression]
    active = prototypes[int(rng.integers(len(prototypes)))]
    intensity = 0.0 if expression == "neutral" else float(rng.uniform(config.min_intensity, 1.0))
    au = {u: 0.0 for u in ACTION_UNITS}
    resting = rng.uniform(0, 0.18, len(ACTION_UNITS)) * (rng.random(len(ACTION_UNITS)) < 0.12)
    for k, u in enumerate(ACTION_UNITS):
        au[u] = float(resting[k])
    for u in active:
        au[u] = float(np.clip(intensity * rng.uniform(0.75, 1.2), au[u], 1.0))
    contempt_side = int(rng.choice([-1, 1])) if expression == "contempt" else 0

    # Group attributes, with optional label-group correlation in the training split.
    weights = np.asarray(config.skin_tone_weights, float)
    tone = int(rng.choice(6, p=weights / weights.sum()))
    if split == "train" and rng.random() < config.bias:
        tone = label % 6
    hair_rgb = _mix((25, 18, 12), (120, 80, 40), float(rng.uniform()))
    old = bool(rng.random() < config.old_fraction)
    if old:
        hair_rgb = _mix(hair_rgb, (200, 200, 200), 0.7)
    attrs = _Attributes(
        skin_tone=tone,
        hair=int(rng.integers(len(HAIR_STYLES))),
        old=old,
        glasses=bool(rng.random() < config.glasses_fraction),
        hair_rgb=hair_rgb,
        iris_rgb=_mix((40, 90, 140), (70, 45, 20), float(rng.uniform())),
        lip_rgb=_mix((180, 80, 85), (150, 60, 70), float(rng.uniform())),
    )

    # Geometry in face fractions, yaw, then pose to pixels.
    ident = _sample_identity(rng)
    lm_frac = _face_landmarks(ident, au, contempt_side)
    thetas = np.linspace(-0.12, math.pi + 0.12, 25)  # top of the head: from the right temple over to the left
    head_top = np.stack([0.5 + ident.face_w * 1.02 * np.cos(thetas), 0.5 - ident.face_h * 1.15 * np.sin(thetas)], 1)
    head_frac = np.vstack([lm_frac[0:17], head_top])
    m, yaw = _pose_matrix(rng, size)
    head_depth = np.concatenate([_DEPTH[0:17], np.full(len(head_top), -0.2)])
    lm = _to_pixels(_apply_yaw(lm_frac, yaw, _DEPTH), m)
    head = _to_pixels(_apply_yaw(head_frac, yaw, head_depth), m)

    img = _background(rng, size)
    _render_face(img, lm, head, attrs, au, contempt_side, size)

    occlusion = np.zeros((size, size), np.uint8)
    occluder = "none"
    if rng.random() < config.occlusion_fraction:
        occluder = OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]
        _draw_occluder(img, occlusion, occluder, lm, rng, size)

    # Photometric nuisance: lighting gradient, blur, noise.
    gx, gy = rng.normal(0, 1, 2)
    strength = rng.uniform(0.0, 0.35)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img *= (1 + strength * (gx * xx + gy * yy) / (math.hypot(gx, gy) + 1e-9))[..., None]
    img *= rng.uniform(0.75, 1.15)
    sigma = float(rng.uniform(0.0, 1.0)) * size / 112
    if sigma > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, rng.uniform(2, 10), img.shape).astype(np.float32)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)

    regions = _au_region_masks(lm, size // 4, size, contempt_side, float(lm[27][0]))
    x0, y0 = np.min(head, axis=0)
    x1, y1 = np.max(lm[0:17], axis=0)
    record = {
        "image_id": f"{split}_{index:06d}",
        "path": f"images/{split}/{split}_{index:06d}.png",
        "split": split,
        "label": label,
        "clean_label": label,
        "expression": expression,
        "intensity": round(intensity, 4),
        "landmarks": [round(float(v), 3) for v in lm.reshape(-1)],
        "bbox": [round(float(v), 2) for v in (x0, y0, x1, y1)],
        "au_intensity": [round(au[u], 4) for u in ACTION_UNITS],
        "skin_tone": SKIN_TONES[attrs.skin_tone],
        "hair": HAIR_STYLES[attrs.hair],
        "age": AGE_GROUPS[int(attrs.old)],
        "glasses": "yes" if attrs.glasses else "no",
        "occluded": occluder != "none",
        "occluder": occluder,
        "low_intensity": expression != "neutral" and intensity < 0.3,
    }
    return rgb, record, occlusion, regions


def render_sample(config: SynthFERConfig, split: str, index: int) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """Render one SynthFER sample in memory: (RGB uint8 [S, S, 3], manifest record, occlusion [S, S], AU regions).

    Useful for inspection and tests; ``generate_synthfer`` writes the same pixels to disk.
    """
    label_names = get_label_space(config.label_space).names
    return _render_one(config, SPLITS.index(split), index, label_names)


def render_image(config: SynthFERConfig, image_id: str) -> np.ndarray:
    """The RGB uint8 pixels of image ``image_id`` (``<split>_<index>``) straight from the generator: the same bytes
    as the PNG :func:`generate_synthfer` wrote for it (PNG is lossless), without reading or decoding that file."""
    split, _, number = str(image_id).rpartition("_")
    if split not in SPLITS or not number.isdigit():
        raise DataError(f"SynthFER image_id {image_id!r}: expected <split>_<index>, e.g. train_000042")
    label_names = get_label_space(config.label_space).names
    return _render_one(config, SPLITS.index(split), int(number), label_names)[0]


def config_from_card(card: dict) -> SynthFERConfig:
    """The :class:`SynthFERConfig` recorded in a ``synthfer.yaml`` card."""
    params = dict(card["parameters"])
    params["skin_tone_weights"] = tuple(params.get("skin_tone_weights", (1.0,) * 6))
    known = {f.name for f in fields(SynthFERConfig)}
    return SynthFERConfig(**{k: v for k, v in params.items() if k in known})


def _render_chunk(args) -> list:
    config, out_dir, jobs, label_names = args
    cv2.setNumThreads(1)
    results = []
    for split_index, index in jobs:
        rgb, record, occlusion, regions = _render_one(config, split_index, index, label_names)
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise DataError(f"could not encode {record['path']} as PNG")
        (out_dir / record["path"]).write_bytes(png.tobytes())
        results.append((record, np.packbits(occlusion.reshape(-1)), np.packbits(regions.reshape(len(regions), -1), 1)))
    return results


def _flip_labels(records: list[dict], config: SynthFERConfig, label_names: tuple[str, ...]) -> None:
    """Flip ``label_noise`` of the training labels in place (exact count, seeded), keeping ``clean_label``."""
    train = [r for r in records if r["split"] == "train"]
    n_flip = round(config.label_noise * len(train))
    if n_flip == 0:
        return
    rng = np.random.default_rng([config.seed, 0xF11B])
    chosen = rng.choice(len(train), size=n_flip, replace=False)
    n = len(label_names)
    for k in sorted(chosen.tolist()):
        r = train[k]
        if config.noise_type == "symmetric":
            new = (r["clean_label"] + int(rng.integers(1, n))) % n
        else:
            partner = _CONFUSABLE[label_names[r["clean_label"]]]
            new = label_names.index(partner) if partner in label_names else (r["clean_label"] + 1) % n
        r["label"] = new


def check_output_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing folder unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: the folder exists; pass --overwrite to replace it")


def generate_synthfer(
    *,
    out: str | os.PathLike,
    config: SynthFERConfig | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Render SynthFER into ``out`` and return its path.

    The tree is written into a temporary sibling folder and renamed into place at the end, so ``out`` is either
    complete or untouched.

    Args:
        out: Target folder; must not exist unless ``overwrite``.
        config: Generation parameters (defaults: 6,000/1,000/2,000 images at 112 px, seed 0).
        workers: Processes to render with (default: all cores). The output does not depend on it.
        overwrite: Replace an existing folder.
        progress: Optional callable ``progress(done, total)``.
    """
    config = config or SynthFERConfig()
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    label_names = get_label_space(config.label_space).names
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)

    jobs = [(s, i) for s, n in enumerate((config.n_train, config.n_val, config.n_test)) for i in range(n)]
    chunk = 100
    tasks = [(config, tmp, jobs[k : k + chunk], label_names) for k in range(0, len(jobs), chunk)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    results = []
    try:
        if workers == 1:
            iterator = map(_render_chunk, tasks)
            for part in iterator:
                results.extend(part)
                if progress:
                    progress(len(results), len(jobs))
        else:
            with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
                for part in pool.imap(_render_chunk, tasks):
                    results.extend(part)
                    if progress:
                        progress(len(results), len(jobs))

        records = [r for r, _, _ in results]
        _flip_labels(records, config, label_names)
        for i, r in enumerate(records):
            r["mask_index"] = i
        manifest = pd.DataFrame.from_records(records, columns=list(MANIFEST_COLUMNS))
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        occlusion = np.stack([o for _, o, _ in results]) if results else np.zeros((0, config.size**2 // 8), np.uint8)
        grid = config.size // 4
        regions = (
            np.stack([g for _, _, g in results])
            if results
            else np.zeros((0, len(ACTION_UNITS), grid * grid // 8 + 1), np.uint8)
        )
        np.savez_compressed(
            tmp / "masks.npz", occlusion=occlusion, au_regions=regions, action_units=np.array(ACTION_UNITS)
        )
        card = _card(config, manifest)
        (tmp / "synthfer.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _card(config: SynthFERConfig, manifest: pd.DataFrame) -> dict:
    params = asdict(config)
    params["skin_tone_weights"] = list(config.skin_tone_weights)
    counts = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    return {
        "dataset": "synthfer",
        "format_version": 1,
        "parameters": json.loads(json.dumps(params)),
        "counts": counts,
        "label_space": config.label_space,
        "action_units": list(ACTION_UNITS),
        "au_region_grid": config.size // 4,
        "group_columns": list(GROUP_COLUMNS),
        "subset_columns": list(SUBSET_COLUMNS),
        "columns": MANIFEST_COLUMNS,
    }


def load_masks(root: str | os.PathLike, config_size: int) -> dict[str, np.ndarray]:
    """Unpack ``masks.npz``: occlusion (N, S, S) uint8 and au_regions (N, n_AU, G, G) uint8."""
    path = Path(root) / "masks.npz"
    if not path.is_file():
        raise DataError(f"{path}: missing (SynthFER masks)")
    with np.load(path, allow_pickle=False) as data:
        occ = np.unpackbits(data["occlusion"], axis=1, count=config_size * config_size)
        grid = config_size // 4
        reg = np.unpackbits(data["au_regions"], axis=2, count=grid * grid)
        return {
            "occlusion": occ.reshape(-1, config_size, config_size),
            "au_regions": reg.reshape(len(reg), len(ACTION_UNITS), grid, grid),
        }


@register_dataset("synthfer")
def load_synthfer(root: Path) -> DatasetInfo:
    """Read a SynthFER tree written by :func:`generate_synthfer`."""
    card_path, manifest_path = root / "synthfer.yaml", root / "manifest.parquet"
    for path in (card_path, manifest_path):
        if not path.is_file():
            raise DataError(
                f"{path}: missing; {root} is not a SynthFER folder (looked for synthfer.yaml and manifest.parquet). "
                f"Create one with: ferbench data synth --out {root}"
            )
    try:
        card = yaml.safe_load(card_path.read_text())
        manifest = pd.read_parquet(manifest_path)
    except (yaml.YAMLError, OSError, ValueError) as exc:
        raise DataError(f"{root}: cannot read the SynthFER card or manifest: {exc}") from None
    if not isinstance(card, dict) or "parameters" not in card:
        raise DataError(f"{card_path}: not a SynthFER card (no 'parameters' key)")
    size = int(card["parameters"]["size"])
    return DatasetInfo(
        name="synthfer",
        root=root,
        layout=f"synthfer v{card.get('format_version', 1)}",
        label_space=get_label_space(card.get("label_space", "all8")),
        manifest=manifest,
        group_columns=tuple(card.get("group_columns", GROUP_COLUMNS)),
        subset_columns=tuple(card.get("subset_columns", SUBSET_COLUMNS)),
        # synth_config lets the prepared cache render the pixels from the generator instead of decoding the PNGs.
        extras={"image_size": size, "masks": lambda: load_masks(root, size), "synth_config": config_from_card(card)},
    )


def mean_face_landmarks() -> np.ndarray:
    """The 68 iBUG points (fractions of the image side) of SynthFER's average identity with a neutral face: the
    mean-shape template that 5-point landmarks are fitted to and per-class template AU maps are drawn on."""
    mid = _Identity(**{name: (lo + hi) / 2 for name, (lo, hi) in _IDENTITY_RANGES.items()})
    return _face_landmarks(mid, {}, 0)
