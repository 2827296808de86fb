"""Reproducible test-time perturbations for robustness evaluation (``ferbench eval --perturb KIND``).

Each is a pure function of (image, seed, image id), so two runs of the same protocol perturb identically.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from fer_bench.errors import ConfigError

PERTURBATIONS: tuple[str, ...] = ("occlusion", "blur", "noise", "jpeg")


def perturb_image(image: np.ndarray, kind: str, *, seed: int, key: str) -> np.ndarray:
    """Apply perturbation ``kind`` to an RGB uint8 image; randomness is drawn from (``seed``, ``key``).

    * ``occlusion``: a grey box covering 25 % of the image area at a random position;
    * ``blur``: Gaussian blur, sigma = 2 % of the image side;
    * ``noise``: additive Gaussian noise, sigma = 15 grey levels;
    * ``jpeg``: JPEG re-encoding at quality 20.

    Example:
        >>> img = np.full((40, 40, 3), 200, np.uint8)
        >>> out = perturb_image(img, "occlusion", seed=0, key="a")
        >>> int((out != 200).any(axis=2).sum()), bool((perturb_image(img, "occlusion", seed=0, key="a") == out).all())
        (400, True)
    """
    if kind not in PERTURBATIONS:
        raise ConfigError(f"--perturb: expected one of {list(PERTURBATIONS)}, got {kind!r}")
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{kind}/{key}".encode()))
    height, width = image.shape[:2]
    if kind == "occlusion":
        box_h, box_w = max(1, height // 2), max(1, width // 2)
        y0, x0 = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        out = image.copy()
        out[y0 : y0 + box_h, x0 : x0 + box_w] = 128
        return out
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), sigmaX=max(0.5, 0.02 * max(height, width)))
    if kind == "noise":
        return np.clip(image.astype(np.float32) + rng.normal(0, 15, image.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 20])
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
