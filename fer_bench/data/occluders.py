"""Synthetic occluders drawn on clean training faces, with their exact per-pixel mask (the ``occlusion`` head's
augmentation; Latent-OFER trains on copy-pasted objects, we draw procedural ones so no image set is needed).

Kinds (:data:`OCCLUDER_KINDS`): ``object`` (a textured ellipse or polygon: cups, phones, microphones), ``hand``
(a skin-coloured palm with four fingers), ``bar`` (a straight band across the face: straps, hair strands, railings),
``patch`` (a rectangle of noise: random-patch occlusion). Each covers roughly 8-35 % of the image. The shapes are
unlike SynthFER's own occluders (sunglasses, masks, scarves, blocks), so a SynthFER occluded test split measures
transfer to unseen occluders.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from fer_bench.errors import ConfigError

OCCLUDER_KINDS: tuple[str, ...] = ("object", "hand", "bar", "patch")
_SKIN = np.array([[246, 222, 204], [212, 165, 125], [176, 124, 86], [131, 86, 56], [84, 56, 40]], np.float32)


def check_occluder_kinds(kinds, *, option: str = "occluder_kinds") -> tuple[str, ...]:
    """``kinds`` as a tuple if each is one of :data:`OCCLUDER_KINDS`, else a ConfigError naming ``option``."""
    kinds = tuple(kinds) if isinstance(kinds, list | tuple) else (kinds,)
    unknown = [k for k in kinds if k not in OCCLUDER_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"{option}: expected a non-empty subset of {list(OCCLUDER_KINDS)}, got {list(kinds)}")
    return kinds


def draw_occluder(
    image: np.ndarray, rng: np.random.Generator, kinds: tuple[str, ...] = OCCLUDER_KINDS
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of RGB uint8 ``image`` with one random occluder, and its mask (uint8 [H, W], 1 = occluded).

    Example:
        >>> img = np.full((64, 64, 3), 128, np.uint8)
        >>> out, mask = draw_occluder(img, np.random.default_rng(0), ("patch",))
        >>> bool(0.05 < mask.mean() < 0.4), bool((out[mask == 0] == 128).all())
        (True, True)
    """
    height, width = image.shape[:2]
    side = min(height, width)
    mask = np.zeros((height, width), np.uint8)
    kind = kinds[int(rng.integers(len(kinds)))]
    centre = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.25, 0.85) * height])
    colour = rng.uniform(0, 255, 3)
    if kind == "object":
        if rng.random() < 0.5:
            axes = rng.uniform(0.12, 0.25, 2) * side
            cv2.ellipse(mask, (centre, 2 * axes, float(rng.uniform(0, 180))), 1, -1)
        else:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = rng.uniform(0.12, 0.28, n) * side
            poly = centre + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    elif kind == "hand":
        colour = _SKIN[int(rng.integers(len(_SKIN)))] * rng.uniform(0.85, 1.1)
        angle = rng.uniform(0, 2 * math.pi)
        along = np.array([math.cos(angle), math.sin(angle)])
        across = np.array([-along[1], along[0]])
        cv2.ellipse(mask, (centre, (0.26 * side, 0.2 * side), math.degrees(angle)), 1, -1)
        for k in range(4):
            base = centre + across * (k - 1.5) * 0.055 * side
            tip = base + along * rng.uniform(0.16, 0.22) * side
            cv2.line(mask, tuple(np.round(base).astype(int)), tuple(np.round(tip).astype(int)), 1, max(2, side // 20))
    elif kind == "bar":
        thickness = max(2, int(rng.uniform(0.08, 0.18) * side))
        angle = rng.uniform(0, math.pi)
        d = np.array([math.cos(angle), math.sin(angle)]) * 2 * side
        a, b = np.round(centre - d).astype(int), np.round(centre + d).astype(int)
        cv2.line(mask, tuple(a), tuple(b), 1, thickness)
    else:  # patch
        h, w = (rng.uniform(0.25, 0.5, 2) * side).astype(int)
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[y0 : y0 + h, x0 : x0 + w] = 1
    fill = np.empty_like(image, dtype=np.float32)
    fill[:] = colour
    if kind in ("object", "patch"):  # texture, so a detector cannot key on flat colour alone
        fill += rng.normal(0, rng.uniform(5, 40), fill.shape)
    out = image.copy()
    covered = mask.astype(bool)
    out[covered] = np.clip(fill[covered], 0, 255).astype(np.uint8)
    return out, mask
