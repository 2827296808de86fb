"""Action-unit (AU) maps: where on a face the muscles of an expression act, drawn from 68 landmarks.

Used by the ``au_heatmap`` head as its training target and by the evaluator for ATT-COS / CAM-COS (Belharbi et al.,
"Guided Interpretable Facial Expression Recognition via Spatial Action Unit Cues", FG 2024).

* :data:`CODEBOOK`: expression → AUs, the paper's Fig. 2 (after Martinez et al., "Automatic Analysis of Facial
  Actions: A Survey", 2017). Disgust uses AU10 (upper-lip raiser) as the paper says; the released code has AU5 there.
  Neutral and contempt have no AUs, so no map: those samples are left out of the loss and of the metric.
* :func:`au_ellipses`: each AU as one or two filled ellipses placed from the iBUG-300W 68 points, as in the
  released code (``action_units.py``); radii given there in pixels of a 224 px crop are scaled to the image size,
  and every ellipse is turned by the face's roll (the eye line) so a map drawn on a rotated face is the rotated map.
  Two placements are made mirror-symmetric so a map follows a horizontal flip: AU10 uses (x48, y50) and
  (x54, y52) where the code has (x52, y54), AU20 the midpoints of 48-6 and 54-10 (the code has 50-10), and AU17
  sits between points 57 and 8 (the code uses 59, off the midline).
* :func:`draw_au_map`: per AU, the ellipses on an image-sized canvas, softened (area-downsampled to 28 x 28,
  3 x 3 box blur, bilinear back up); the pixel-wise max over AUs, min-max normalised to [0, 1].
* Landmark sources, in order: 68 points as given; 5 points (eyes, nose, mouth corners, RAF-DB's manual files)
  → the 68-point mean template fitted by a similarity transform (:func:`fit_template`); none → the class's map
  drawn on the template placed as in an aligned crop (:func:`template_au_map`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fer_bench.faces.align import fit_68_from_5, five_from_68

#: The paper's expression → AU codebook (FACS numbers).
CODEBOOK: dict[str, tuple[int, ...]] = {
    "happiness": (6, 12, 25),
    "surprise": (1, 2, 5, 26, 27),
    "fear": (1, 2, 4, 5, 20, 25, 26, 27),
    "anger": (4, 5, 7, 10, 17, 23, 24, 25, 26),
    "disgust": (9, 10, 16, 17, 25, 26),
    "sadness": (1, 4, 6, 15, 17),
    "neutral": (),
    "contempt": (),
}
#: Every AU the codebook uses: the class-agnostic ("generic") map.
GENERIC_AUS: tuple[int, ...] = tuple(sorted({au for aus in CODEBOOK.values() for au in aus}))
#: Map sources, as logged per sample (index = code in ``heatmap_source``).
MAP_SOURCES: tuple[str, ...] = ("none", "landmarks68", "fit5", "template", "truth")

_SOFTEN_GRID = 28
_REFERENCE_SIZE = 224.0  # the released code's pixel radii are for 224 px crops


def _roll(points: np.ndarray) -> float:
    """Face roll in degrees: the angle of the line from the image-left eye centre to the image-right one."""
    left, right = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def au_ellipse_params(points: torch.Tensor, au: int, size: int) -> torch.Tensor:
    """The ellipses of ``au`` for a batch of 68-landmark sets, as [B, E, 4] (cx, cy, a, b) in pixels of a ``size``
    px image: the one implementation behind :func:`au_ellipses` (CPU maps) and :func:`draw_au_maps` (device maps).

    ``points`` [B, 68, 2] (any float dtype; float64 keeps the CPU maps' exact values).
    """
    p = points
    px = size / _REFERENCE_SIZE  # one pixel of the 224 px reference
    zero = p[:, 0, 0] * 0

    def at(x, y, a, b):
        # broadcasting a python number against a [B] tensor keeps this usable for scalars and tensors alike
        return torch.stack([x + zero, y + zero, torch.clamp(a + zero, min=1.0), torch.clamp(b + zero, min=1.0)], dim=-1)

    def nonzero_or(value, fallback):
        return torch.where(value == 0, torch.full_like(value, fallback), value)

    def box(xs, ys, grow_b=0.0, minimum=5.0):
        x0, x1 = p[:, xs, 0].amin(dim=1), p[:, xs, 0].amax(dim=1)
        y0, y1 = p[:, ys, 1].amin(dim=1), p[:, ys, 1].amax(dim=1)
        a = nonzero_or((x1 - x0) / 2, minimum * px)
        b = nonzero_or((y1 - y0) / 2, minimum * px)
        return at((x0 + x1) / 2, (y0 + y1) / 2, a, b + grow_b * px)

    def mid(i, j):
        return (p[:, i] + p[:, j]) / 2

    def spread(i, j, fallback):  # half the distance between two points along x and y, 10 px when they coincide
        return nonzero_or((p[:, i, 0] - p[:, j, 0]).abs() / 2, fallback), nonzero_or(
            (p[:, i, 1] - p[:, j, 1]).abs() / 2, fallback
        )

    r20 = 20 * px
    if au in (1, 2):
        i, j = (20, 23) if au == 1 else (18, 25)
        ellipses = [at(p[:, k, 0], p[:, k, 1], size / 8, size / 10) for k in (i, j)]
    elif au == 4:
        c = mid(19, 24)
        ellipses = [at(c[:, 0], c[:, 1], *spread(19, 24, 10 * px))]
    elif au in (5, 7, 43):
        grow = 0.0 if au == 5 else 10.0
        ellipses = [box([36, 39], [38, 41], grow), box([42, 45], [44, 47], grow)]
    elif au == 6:
        ellipses = [at(p[:, k, 0], p[:, k, 1] + size / 6, size / 10, size / 10) for k in (41, 46)]
    elif au == 9:
        ellipses = [at(p[:, 31, 0], p[:, 29, 1], r20, r20), at(p[:, 35, 0], p[:, 29, 1], r20, r20)]
    elif au == 10:
        ellipses = [at(p[:, 48, 0], p[:, 50, 1], r20, r20), at(p[:, 54, 0], p[:, 52, 1], r20, r20)]
    elif au in (12, 15):
        ellipses = [at(p[:, k, 0], p[:, k, 1], r20, r20) for k in (48, 54)]
    elif au == 14:
        ellipses = [at(p[:, 48, 0] - r20, p[:, 48, 1], r20, r20), at(p[:, 54, 0] + r20, p[:, 54, 1], r20, r20)]
    elif au == 16:
        ellipses = [at(p[:, k, 0], p[:, k, 1], r20, r20) for k in (59, 55)]
    elif au == 17:
        c = mid(57, 8)
        ellipses = [at(c[:, 0], c[:, 1], *spread(57, 8, 10 * px))]
    elif au == 20:
        ellipses = [at(c[:, 0], c[:, 1], r20, r20) for c in (mid(48, 6), mid(54, 10))]
    elif au in (23, 24, 26, 27):
        ellipses = [box([48, 54], [51, 57])]
    elif au == 25:
        ellipses = [at(p[:, k, 0], p[:, k, 1], 25 * px, 10 * px) for k in (51, 57)]
    else:
        raise ValueError(f"AU{au}: no region defined (known: {sorted(GENERIC_AUS)})")
    return torch.stack(ellipses, dim=1)


def au_ellipses(points: np.ndarray, au: int, size: int) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The ellipses (centre (x, y), semi-axes (a, b)) of ``au`` on a ``size`` px image with 68 landmarks ``points``.

    Example:
        >>> pts = np.zeros((68, 2)); pts[48] = (80, 150); pts[54] = (144, 150)
        >>> au_ellipses(pts, 12, 224)
        [((80.0, 150.0), (20.0, 20.0)), ((144.0, 150.0), (20.0, 20.0))]
    """
    batch = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(1, 68, 2))
    return [((cx, cy), (a, b)) for cx, cy, a, b in au_ellipse_params(batch, au, size)[0].tolist()]


def _soften(canvas: np.ndarray) -> np.ndarray:
    size = canvas.shape[0]
    small = cv2.resize(canvas, (_SOFTEN_GRID, _SOFTEN_GRID), interpolation=cv2.INTER_AREA)
    small = cv2.blur(small, (3, 3), borderType=cv2.BORDER_CONSTANT)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def draw_au_map(points: np.ndarray, aus: tuple[int, ...], size: int) -> np.ndarray | None:
    """The softened AU map (float32 [size, size] in [0, 1]) of ``aus`` on 68 landmarks ``points`` (pixels), or
    None when there is nothing to draw (no AUs, or every ellipse falls outside the image).

    Example:
        >>> from fer_bench.data.synthfer import mean_face_landmarks
        >>> m = draw_au_map(mean_face_landmarks() * 64, CODEBOOK["happiness"], 64)
        >>> m.shape, float(m.max()), float(m[:16].max()) < 0.05  # mouth and cheeks, nothing on the forehead
        ((64, 64), 1.0, True)
    """
    if not aus:
        return None
    points = np.asarray(points, dtype=np.float64).reshape(68, 2)
    angle = _roll(points)
    out = np.zeros((size, size), np.float32)
    for au in aus:
        canvas = np.zeros((size, size), np.float32)
        for (cx, cy), (a, b) in au_ellipses(points, au, size):
            cv2.ellipse(canvas, ((cx, cy), (2 * a, 2 * b), angle), 1.0, -1, lineType=cv2.LINE_AA)
        if canvas.max() > 0:
            np.maximum(out, _soften(canvas), out=out)
    low, high = float(out.min()), float(out.max())
    if high <= 0:
        return None
    return (out - low) / (high - low) if high > low else out / high


def template_landmarks(height: int, width: int | None = None) -> np.ndarray:
    """The mean 68-point face (:func:`fer_bench.data.synthfer.mean_face_landmarks`) placed as in an aligned crop of
    ``height`` x ``width`` px: the eyes at about 45 % of the height, 37 % of the width apart."""
    from fer_bench.data.synthfer import mean_face_landmarks

    return mean_face_landmarks() * np.array([width or height, height], dtype=np.float64)


def five_point(points68: np.ndarray) -> np.ndarray:
    """The 5 points (image-left eye, image-right eye, nose, left and right mouth corner) of 68 landmarks."""
    return five_from_68(np.asarray(points68, dtype=np.float64))


def fit_template(points5: np.ndarray, size: int = 1) -> np.ndarray:
    """68 landmarks from 5: the mean template moved by the least-squares similarity (Umeyama) onto ``points5``.

    Example:
        >>> t = template_landmarks(100)
        >>> bool(np.allclose(fit_template(five_point(t) * 2 + 3), t * 2 + 3))
        True
    """
    five = np.asarray(points5, dtype=np.float64).reshape(1, 5, 2)
    return fit_68_from_5(five, mean_shape=template_landmarks(size))[0]


def landmarks68(points: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """68 landmarks from whatever a dataset gives (68 points, 5 points or none) and the :data:`MAP_SOURCES` code."""
    if points is None or len(points) == 0:
        return None, 0
    if len(points) == 68:
        return np.asarray(points, dtype=np.float64), 1
    if len(points) == 5:
        return fit_template(points), 2
    return None, 0


def template_au_map(aus: tuple[int, ...], size: int) -> np.ndarray | None:
    """The map of ``aus`` drawn on the mean template: the per-class map for datasets without landmarks."""
    return draw_au_map(template_landmarks(size), aus, size)


def expression_aus(expression: str, *, generic: bool = False) -> tuple[int, ...]:
    """The AUs to draw for a sample of ``expression`` (none for neutral/contempt; all codebook AUs if generic)."""
    aus = CODEBOOK.get(expression, ())
    return GENERIC_AUS if generic and aus else aus


# ---------------------------------------------------------------------------------------------------------------------
# Batched maps in torch (the device-side loader draws them from the augmented landmarks, on the GPU)

_SUPERSAMPLE = 4  # k x k coverage samples per cell of the 28 x 28 softening grid


def _au_index() -> dict[int, int]:
    return {au: k for k, au in enumerate(GENERIC_AUS)}


def expression_au_mask(label_names: tuple[str, ...], *, generic: bool = False) -> torch.Tensor:
    """[K, len(GENERIC_AUS)] bool: which AUs each class's map draws (:func:`expression_aus`, as a table)."""
    index = _au_index()
    table = torch.zeros(len(label_names), len(GENERIC_AUS), dtype=torch.bool)
    for k, name in enumerate(label_names):
        for au in expression_aus(name, generic=generic):
            table[k, index[au]] = True
    return table


def _cell_coverage(ellipses: torch.Tensor, angle: torch.Tensor, size: int) -> torch.Tensor:
    """Fraction of each cell of the 28 x 28 grid over a ``size`` px image covered by the union of ``ellipses``
    [B, E, 4] turned by ``angle`` [B] (radians): cv2's INTER_AREA downsampling of a filled-ellipse canvas, computed
    without the canvas. Returns [B, 28, 28]."""
    grid, k = _SOFTEN_GRID, _SUPERSAMPLE
    step = size / grid
    offsets = (torch.arange(grid * k, device=ellipses.device, dtype=ellipses.dtype) + 0.5) / k  # in cells
    coords = offsets * step - 0.5  # pixel-centre coordinates of the samples, [G*k]
    cos, sin = torch.cos(angle)[:, None, None, None], torch.sin(angle)[:, None, None, None]
    cx, cy, a, b = (ellipses[..., i][:, :, None, None] for i in range(4))  # [B, E, 1, 1]
    dx = coords.view(1, 1, 1, -1) - cx  # [B, E, 1, X]
    dy = coords.view(1, 1, -1, 1) - cy  # [B, E, Y, 1]
    along = (dx * cos + dy * sin) / a
    across = (-dx * sin + dy * cos) / b
    inside = (along * along + across * across <= 1.0).any(dim=1).to(ellipses.dtype)  # [B, Y, X]
    return F.avg_pool2d(inside.unsqueeze(1), k).squeeze(1)  # [B, G, G]


def draw_au_maps(
    points: torch.Tensor, au_mask: torch.Tensor, size: int, *, out_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AU maps for a batch, drawn like :func:`draw_au_map` but in torch on ``points``' device.

    Per AU: the ellipses' area coverage of each cell of the 28 x 28 grid (cv2's INTER_AREA of the filled canvas),
    a 3 x 3 box blur with zero border, bilinear up to the image; the pixel-wise max over the sample's AUs, min-max
    normalised to [0, 1]. Agrees with the cv2 maps to a cosine of about 0.99 (``tests/test_device_loader.py``).

    Args:
        points: [B, 68, 2] landmarks in pixels of a ``size`` px image.
        au_mask: [B, len(GENERIC_AUS)] bool, the AUs to draw per sample (:func:`expression_au_mask` rows).
        size: The image side the points are in.
        out_size: Side of the returned maps (default ``size``).

    Returns:
        (maps float32 [B, S, S] in [0, 1], valid bool [B]: the sample has AUs and at least one falls on the image).
    """
    out_size = out_size or size
    points = points.float()
    b = len(points)
    left, right = points[:, 36:42].mean(dim=1), points[:, 42:48].mean(dim=1)
    angle = torch.atan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0])  # the face roll, as _roll
    grid = points.new_zeros(b, 1, _SOFTEN_GRID, _SOFTEN_GRID)
    for k, au in enumerate(GENERIC_AUS):
        ellipses = au_ellipse_params(points, au, size)
        soft = F.avg_pool2d(_cell_coverage(ellipses, angle, size).unsqueeze(1), 3, stride=1, padding=1)
        grid = torch.maximum(grid, soft * au_mask[:, k].to(soft.dtype).view(b, 1, 1, 1))
    # the max over AUs on the 28 x 28 grid, then one bilinear upsampling (cv2 takes the max after upsampling each
    # AU; the two differ only where two AUs meet inside a cell, and one upsampling is 18 times cheaper)
    out = F.interpolate(grid, size=(out_size, out_size), mode="bilinear", align_corners=False).squeeze(1)
    flat = out.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    valid = au_mask.any(dim=1) & (high > 0)
    span = torch.where(high > low, high - low, high).clamp_min(1e-12)
    low = torch.where(high > low, low, torch.zeros_like(low))
    maps = ((out - low.view(b, 1, 1)) / span.view(b, 1, 1)) * valid.view(b, 1, 1)
    return maps, valid
