"""Five-point face alignment: named templates, a batched least-squares similarity (Umeyama), and the warp.

A face is aligned by the similarity transform (rotation, uniform scale, translation) that moves its five landmarks
(``detection.LANDMARK_NAMES`` order) closest, in least squares, to a template's five points. The estimate is the
closed form of Umeyama (1991), batched in torch; it is *not* ``cv2.estimateAffinePartial2D`` with its defaults,
whose RANSAC drops a landmark as an outlier on ordinary faces (faces.md A3.4).

The warp runs on the device for a batch of faces (``warp_faces``, bilinear, zeros outside) and agrees with
``cv2.warpAffine(..., INTER_LINEAR, borderValue=0)`` (``warp_image``), which is what the CPU path uses.

Landmarks move with the crop through the same matrix (:func:`transform_points`), and :func:`fit_68_from_5` places a
68-point mean shape (iBUG-300W order) on a face from its five points, for the AU-heatmap head (faces.md A3.5):
a rigid shape, so region priors rather than expression geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fer_bench.registry import Registry


@dataclass(frozen=True)
class Template:
    """Five reference points (x, y) in pixels of a ``size`` x ``size`` crop, and where they come from."""

    name: str
    size: int
    points: tuple[tuple[float, float], ...]
    source: str

    def at(self, size: int) -> np.ndarray:
        """The points for a ``size`` x ``size`` crop, float32 [5, 2]: scaled by size / native size, as InsightFace's
        ``estimate_norm`` scales arcface_dst (so arcface112 at 224 is arcface224)."""
        return (np.asarray(self.points, np.float64) * (size / self.size)).astype(np.float32)


def scale_points(points, *, from_size: float, to_size: float) -> np.ndarray:
    """Pixel coordinates in a ``from_size`` square moved to a ``to_size`` square, float32. Pixel centres scale about
    -0.5 (cv2's convention): (p + 0.5) * to / from - 0.5.

    Example:
        >>> scale_points([[0.0, 55.5]], from_size=112, to_size=224).tolist()
        [[0.5, 111.5]]
    """
    return ((np.asarray(points, np.float64) + 0.5) * (to_size / from_size) - 0.5).astype(np.float32)


TEMPLATES: Registry = Registry("alignment template")

_ARCFACE112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))
TEMPLATES.register(
    "arcface112",
    Template("arcface112", 112, _ARCFACE112, "InsightFace arcface_dst (SphereFace 96x112 reference + 8 px in x)"),
)
TEMPLATES.register(
    "arcface224",
    Template(
        "arcface224",
        224,
        tuple((2 * x, 2 * y) for x, y in _ARCFACE112),
        "InsightFace arcface_dst x 2 (insightface estimate_norm for sizes divisible by 112)",
    ),
)
TEMPLATES.register(
    "ffhq512",
    Template(
        "ffhq512",
        512,
        ((192.98, 239.95), (318.90, 240.19), (256.63, 314.02), (201.26, 371.41), (313.09, 371.15)),
        "FFHQ-style template of face swappers (SimSwap 'ffhq' mode), for generated media",
    ),
)
# RAF-DB's aligned/ crops (100x100) show more of the head than ArcFace crops. How they were made is not published
# (faces.md A3.2); these points put the eyes at 0.286/0.714 of the width and 0.40 of the height, and the mouth at
# 0.714 of the height (the 3-point convention used to re-align RAF-DB from its manual landmarks), with ArcFace's
# nose and mouth-corner proportions in between. To be calibrated against RAF-DB's own crops when they are at hand.
TEMPLATES.register(
    "rafdb_like",
    Template(
        "rafdb_like",
        100,
        ((28.6, 40.0), (71.4, 40.0), (50.0, 56.8), (32.4, 71.4), (67.6, 71.4)),
        "eyes (0.286, 0.4), (0.714, 0.4), mouth line 0.714 of a 100-px crop (approximate RAF-DB aligned framing)",
    ),
)


def get_template(name: str) -> Template:
    """The template called ``name`` (UnknownNameError with suggestions otherwise)."""
    return TEMPLATES.get(name)


def list_templates() -> list[str]:
    return TEMPLATES.names()


def umeyama(source: torch.Tensor, target: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Least-squares similarity transforms mapping ``source`` points onto ``target`` points.

    For each batch item, finds scale s, rotation R (det +1) and translation t minimising
    sum_i ||s R p_i + t - q_i||^2 (Umeyama 1991, "Least-squares estimation of transformation parameters between two
    point patterns", eqs. 40-42): with centred points P, Q, covariance C = Q^T P / n = U S V^T,
    R = U D V^T where D = diag(1, sign(det U det V)), s = tr(S D) / var(P), t = mean(q) - s R mean(p).

    Args:
        source: [B, N, 2] or [N, 2] points (N >= 2).
        target: [B, N, 2] or [N, 2] points (broadcast against ``source``).

        dtype: Of the result (computed in float64 either way).

    Returns:
        [B, 2, 3] matrices M (pixels to pixels), so that target ~= M @ [x, y, 1].

    Example:
        >>> p = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> q = p * 2 + torch.tensor([3.0, 4.0])
        >>> umeyama(p, q).round(decimals=4).tolist()
        [[[2.0, 0.0, 3.0], [0.0, 2.0, 4.0]]]
    """
    src = torch.as_tensor(source, dtype=torch.float64)
    dst = torch.as_tensor(target, dtype=torch.float64).to(src.device)
    src, dst = torch.broadcast_tensors(*(x if x.dim() == 3 else x.unsqueeze(0) for x in (src, dst)))
    mean_src, mean_dst = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    p, q = src - mean_src, dst - mean_dst  # [B, N, 2]
    n = src.shape[1]
    covariance = q.transpose(1, 2) @ p / n  # [B, 2, 2]
    u, singular, vh = torch.linalg.svd(covariance)
    # Reflection guard: a mirror-image fit is never a face alignment.
    d = torch.ones_like(singular)
    d[:, 1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    d[:, 1][d[:, 1] == 0] = 1.0
    rotation = u @ torch.diag_embed(d) @ vh  # [B, 2, 2]
    variance = (p**2).sum(dim=(1, 2)) / n  # [B]
    scale = (singular * d).sum(dim=1) / variance.clamp_min(1e-12)
    translation = mean_dst.squeeze(1) - scale[:, None] * (rotation @ mean_src.squeeze(1)[..., None]).squeeze(-1)
    matrix = torch.cat([scale[:, None, None] * rotation, translation[..., None]], dim=2)
    return matrix.to(dtype)


def alignment_matrices(landmarks: np.ndarray | torch.Tensor, *, template: str, size: int) -> torch.Tensor:
    """[K, 2, 3] similarity matrices taking faces with five ``landmarks`` [K, 5, 2] (image pixels) onto ``template``
    scaled to a ``size`` x ``size`` crop."""
    points = torch.as_tensor(landmarks).detach().float().cpu().reshape(-1, 5, 2)
    reference = torch.from_numpy(get_template(template).at(size))
    return umeyama(points, reference)


def transform_points(points: np.ndarray | torch.Tensor, matrices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Points [K, P, 2] moved by matrices [K, 2, 3]: M @ [x, y, 1] per point; [K, P, 2], float64 for float64
    points, else float32."""
    given = np.asarray(points)
    m = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    pts = given.astype(np.float64).reshape(len(m), -1, 2)
    return (pts @ m[:, :, :2].transpose(0, 2, 1) + m[:, None, :, 2]).astype(_float_type(given))


def _float_type(array: np.ndarray) -> np.dtype:
    """float64 stays float64; everything else (ints, float32, float16) becomes float32."""
    return np.dtype(np.float64) if array.dtype == np.float64 else np.dtype(np.float32)


def antialias_factor(matrix: np.ndarray | torch.Tensor) -> int:
    """How much to shrink the source first (an integer k >= 1, box-averaged) so that the bilinear warp samples it at
    no less than half a pixel per crop pixel; 1 when the face is at most twice the crop's size. Without it a large
    face (a 400-px face into a 112-px crop) aliases, which a classifier trained on smooth crops notices."""
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # crop pixels per source pixel
    # after shrinking by k the warp samples scale * k >= 0.5 crop pixels per source pixel
    return max(1, int(np.ceil(1.0 / (2.0 * scale) - 1e-9))) if scale > 0 else 1


def _shrunk(matrix: np.ndarray, k: float, ky: float) -> np.ndarray:
    """``matrix`` for a source shrunk by (k, ky): shrunk pixel x_s is source pixel (x_s + 0.5) * k - 0.5."""
    to_source = np.array([[k, 0, (k - 1) / 2], [0, ky, (ky - 1) / 2], [0, 0, 1]])
    return (np.vstack([matrix, [0, 0, 1]]) @ to_source)[:2]


def warp_image(
    image: np.ndarray, matrix: np.ndarray | torch.Tensor, size: int, *, antialias: bool = True
) -> np.ndarray:
    """One aligned ``size`` x ``size`` crop of ``image`` (uint8 [H, W, C]) with cv2 (bilinear, black outside).

    With ``antialias`` the source is first box-averaged by :func:`antialias_factor` (cv2 INTER_AREA);
    ``antialias=False`` is exactly ``cv2.warpAffine(image, matrix, (size, size), INTER_LINEAR, borderValue=0)``.
    """
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    k = antialias_factor(m) if antialias else 1
    if k > 1:
        height, width = image.shape[:2]
        small = (max(1, width // k), max(1, height // k))
        m = _shrunk(m, width / small[0], height / small[1])
        image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_faces(
    images: torch.Tensor, matrices: torch.Tensor, image_index: torch.Tensor, size: int, *, antialias: bool = True
) -> torch.Tensor:
    """Aligned crops of many faces from a batch of same-size images, on the images' device.

    Output pixel (x, y) samples the source at M^-1 (x, y) with bilinear weights and zeros outside, in cv2's
    convention of pixel centres at integer coordinates; ``grid_sample`` with ``align_corners=False`` puts centres at
    (2x + 1) / W - 1 in normalised coordinates, which is the conversion below. With ``antialias`` a face much larger
    than the crop is sampled from its image box-averaged by :func:`antialias_factor`, as :func:`warp_image` does.

    Args:
        images: [B, C, H, W] (uint8 or float).
        matrices: [K, 2, 3] image-to-crop matrices (:func:`alignment_matrices`).
        image_index: [K] which image each face comes from.
        size: Side of the crops.

    Returns:
        [K, C, size, size] crops, uint8 when ``images`` is uint8 (rounded), else float.
    """
    device = images.device
    m_all = np.asarray(torch.as_tensor(matrices).detach().cpu(), np.float64).reshape(-1, 2, 3)
    owner = np.asarray(torch.as_tensor(image_index).cpu(), np.int64).reshape(-1)
    factors = np.array([antialias_factor(m) if antialias else 1 for m in m_all], np.int64)
    out = torch.zeros((len(m_all), images.shape[1], size, size), dtype=torch.float32, device=device)
    # one pass per (image, shrink factor): the frame is converted (and shrunk) once, whatever its number of faces
    for i, k in sorted({(int(i), int(k)) for i, k in zip(owner, factors, strict=True)}):
        where = np.nonzero((owner == i) & (factors == k))[0]
        work = images[i : i + 1].float()  # sample in fp32 whatever the images' dtype: coordinates need the bits
        m = m_all[where]
        if k > 1:
            height, width = work.shape[-2:]
            small = (max(1, height // k), max(1, width // k))
            work = F.interpolate(work, size=small, mode="area")
            m = np.stack([_shrunk(x, width / small[1], height / small[0]) for x in m])
        out[torch.from_numpy(where).to(device)] = _grid_warp(work, torch.from_numpy(m).to(device), size)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype) if images.is_floating_point() else out


def _grid_warp(work: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear samples of one image ``work`` [1, C, H, W] (fp32) at M^-1 of each crop pixel, for K matrices:
    [K, C, size, size] (one grid of K x size rows, so the image is not copied per face)."""
    device = work.device
    height, width = work.shape[-2:]
    m = matrices.to(device=device, dtype=torch.float64)
    inverse = torch.linalg.inv(m[:, :, :2])  # [K, 2, 2]
    coords = torch.arange(size, device=device, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    out_points = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2)  # [1, S*S, 2]
    source = (out_points - m[:, None, :, 2]) @ inverse.transpose(1, 2)  # [K, S*S, 2] source pixels
    scale = torch.tensor([width, height], device=device, dtype=torch.float64)
    grid = ((2 * source + 1) / scale - 1).reshape(1, -1, size, 2).float()  # [1, K*S, S, 2]
    crops = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [1, C, K*S, S]
    return crops.reshape(work.shape[1], len(m), size, size).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# 68 points from 5

# Mean 68-point face shape in iBUG-300W order, (x, y) normalised to the face's landmark extent: the TEMPLATE of CMU
# OpenFace (cmusatyalab/openface, openface/align_dlib.py, Apache-2.0), taken as data.
MEAN_SHAPE_68 = np.array(
    [
        (0.079240, 0.339224), (0.082922, 0.456955), (0.096793, 0.575648), (0.122142, 0.691922),
        (0.168688, 0.800341), (0.239789, 0.895733), (0.325662, 0.977069), (0.422318, 1.043290),
        (0.531778, 1.060804), (0.641296, 1.039819), (0.738106, 0.972269), (0.824444, 0.889624),
        (0.894793, 0.792494), (0.939395, 0.681547), (0.961119, 0.562238), (0.970580, 0.441759),
        (0.971193, 0.322119), (0.163846, 0.249152), (0.217804, 0.204256), (0.291299, 0.192367),
        (0.367460, 0.203582), (0.439295, 0.233136), (0.586446, 0.228142), (0.660153, 0.195924),
        (0.737466, 0.182361), (0.813237, 0.192828), (0.870757, 0.235293), (0.515345, 0.318635),
        (0.516221, 0.396200), (0.517119, 0.473798), (0.518164, 0.553158), (0.433701, 0.604054),
        (0.475501, 0.620763), (0.520713, 0.634268), (0.565874, 0.618797), (0.607054, 0.601577),
        (0.252419, 0.331052), (0.298663, 0.302646), (0.355750, 0.303021), (0.403719, 0.338677),
        (0.352507, 0.349988), (0.296792, 0.350479), (0.631326, 0.334137), (0.679073, 0.296454),
        (0.735972, 0.294721), (0.782865, 0.321305), (0.740312, 0.341849), (0.684999, 0.343734),
        (0.353168, 0.746189), (0.414588, 0.719054), (0.477678, 0.706836), (0.522733, 0.717092),
        (0.569832, 0.705414), (0.635196, 0.715656), (0.699517, 0.739419), (0.639447, 0.805237),
        (0.576411, 0.835437), (0.525398, 0.841706), (0.476415, 0.837506), (0.413795, 0.810046),
        (0.380085, 0.749980), (0.477956, 0.745132), (0.523390, 0.748924), (0.571058, 0.743329),
        (0.672409, 0.744177), (0.572540, 0.776609), (0.524011, 0.783371), (0.477561, 0.778476),
    ],
    dtype=np.float32,
)  # fmt: skip


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The five alignment points of 68-point landmarks [..., 68, 2]: eye centres (mean of 36-41 and of 42-47),
    nose tip (30), mouth corners (48, 54), in ``LANDMARK_NAMES`` order (image-left first); float64 for float64 input,
    else float32."""
    given = np.asarray(points)
    pts = given.astype(_float_type(given))
    return np.stack(
        [pts[..., 36:42, :].mean(-2), pts[..., 42:48, :].mean(-2), pts[..., 30, :], pts[..., 48, :], pts[..., 54, :]],
        axis=-2,
    )


def fit_68_from_5(landmarks: np.ndarray, *, mean_shape: np.ndarray = MEAN_SHAPE_68) -> np.ndarray:
    """A 68-point shape for faces known by five points [K, 5, 2]: ``mean_shape`` (68 points, iBUG order; default
    CMU OpenFace's) moved by the least-squares similarity that best maps its own five points onto the given ones
    (rigid: region priors, not expression geometry). [K, 68, 2], float64 for float64 landmarks, else float32.
    """
    given = np.asarray(landmarks)
    five = given.astype(np.float64).reshape(-1, 5, 2)
    shape = np.asarray(mean_shape, np.float64)
    matrices = umeyama(torch.from_numpy(five_from_68(shape)), torch.from_numpy(five), dtype=torch.float64).numpy()
    return transform_points(np.broadcast_to(shape, (len(five), 68, 2)), matrices).astype(_float_type(given))
