"""Training augmentation in torch, batched, on whatever device the images are on (GPU HBM, or the CPU).

The same options and ranges as the albumentations pipeline (:class:`~fer_bench.data.AugmentOptions`), applied to a
whole batch at once:

* one affine warp per sample (``affine_grid`` + ``grid_sample``): horizontal flip, the resize from the cache size to
  the training size, and, with probability ``affine``, rotation (±``rotate``°), scale (1 ± ``scale``, x and y drawn
  independently as albumentations does) and translation (± ``translate`` of the side), about the image centre,
  edges replicated; the same matrix moves the landmarks (and swaps left and right points on a flip);
* brightness and contrast (probability ``color``; x·α + β·255 with α = 1 ± 0.2, β = ± 0.2, clipped);
* Gaussian blur (probability ``blur``; σ in [0.1, 1] px); random erasing (probability ``erasing``; 1-2 black boxes of
  10-25 % of the side);
* the synthetic occluders of :mod:`fer_bench.data.occluders` (object, hand, bar, noise patch) with their masks.

Randomness is counter-based: every number is a hash of (seed, epoch, the sample's position in the epoch's order,
field), so a sample's augmentation does not depend on the batch it lands in, the rank that draws it, the device, or
where a resumed run restarted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fer_bench.data.dataset import FIVE_POINT_FLIP, IBUG68_FLIP
from fer_bench.data.occluders import OCCLUDER_KINDS
from fer_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentOptions

_MASK32 = 0xFFFFFFFF
_FIELDS = 64  # uniforms drawn per sample (indices below)
(F_FLIP, F_AFFINE, F_SX, F_SY, F_ANGLE, F_TX, F_TY, F_COLOR, F_CONTRAST, F_BRIGHT, F_BLUR, F_SIGMA) = range(12)
F_ERASE, F_HOLES = 12, 13  # then 4 per hole from 14 (2 holes)
F_OCCLUDE, F_KIND, F_OCC = 22, 23, 24  # F_OCC .. F_OCC + 29: occluder shape parameters
F_COLOUR = 54  # .. 59: occluder colour, skin tone and factor, texture strength
F_TARGET = 60

# iBUG-300W 68-point and 5-point left/right correspondences, as the CPU path's flip_landmarks
FLIP68, FLIP5 = IBUG68_FLIP.tolist(), FIVE_POINT_FLIP.tolist()
_SKIN = ((246, 222, 204), (212, 165, 125), (176, 124, 86), (131, 86, 56), (84, 56, 40))


# ---------------------------------------------------------------------------------------------------------------------
# Counter-based random numbers


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 ``x`` (values kept in [0, 2^32); multipliers below 2^31, so no int64 overflow).

    Example:
        >>> int(hash32(torch.tensor(1))) != int(hash32(torch.tensor(2)))
        True
    """
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def sample_keys(positions: torch.Tensor, base: int) -> torch.Tensor:
    """Per-sample keys from positions in the epoch's order and a per-epoch ``base`` (from the run's seed)."""
    return hash32(hash32(positions.long()) ^ (base & _MASK32))


def uniforms(keys: torch.Tensor, count: int, *, stream: int = 0) -> torch.Tensor:
    """[B, count] float32 uniforms in [0, 1) as a pure function of ``keys`` [B] and ``stream``."""
    fields = torch.arange(count, device=keys.device, dtype=torch.int64) + (stream << 20)
    bits = hash32(hash32(keys.unsqueeze(1) ^ hash32(fields).unsqueeze(0)) + 0x2545F49)
    return bits.to(torch.float32) / 4294967296.0


def pixel_normals(keys: torch.Tensor, shape: tuple[int, ...], *, stream: int) -> torch.Tensor:
    """[B, *shape] standard normal noise keyed per sample and pixel (Box-Muller on two hashed uniforms)."""
    n = math.prod(shape)
    index = torch.arange(n, device=keys.device, dtype=torch.int64).unsqueeze(0)
    base = hash32(keys.unsqueeze(1) + (stream << 24))
    u1 = (hash32(base ^ hash32(2 * index)).to(torch.float32) + 1.0) / 4294967297.0
    u2 = hash32(base ^ hash32(2 * index + 1)).to(torch.float32) / 4294967296.0
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).view(len(keys), *shape)


def _between(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


# ---------------------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Geometry:
    """Per-sample pixel-space matrices: ``forward`` [B, 3, 3] maps source (cache) pixels to output pixels."""

    forward: torch.Tensor
    flipped: torch.Tensor  # [B] bool


def geometry(u: torch.Tensor, options: AugmentOptions, *, src_size: int, out_size: int, train: bool) -> Geometry:
    """The flip, resize and random affine of each sample as one matrix (albumentations' ``Affine`` conventions:
    rotation about the centre ((S - 1) / 2), [[cos, sin], [-sin, cos]], translation in pixels of the output)."""
    b, device = len(u), u.device
    # built with kernels and python scalars only: a tensor made from a python list would be a host-to-device copy,
    # which waits for the device (no host sync inside the step)
    eye = torch.eye(3, device=device).expand(b, 3, 3).clone()
    flipped = (u[:, F_FLIP] < options.hflip) if train else torch.zeros(b, dtype=torch.bool, device=device)
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(flipped, -1.0, 1.0)
    flip[:, 0, 2] = torch.where(flipped, float(src_size - 1), 0.0)
    ratio = out_size / src_size
    resize = torch.eye(3, device=device) * ratio
    resize[2, 2] = 1.0
    resize[0, 2] = resize[1, 2] = 0.5 * ratio - 0.5
    matrix = resize @ flip
    if train and options.affine > 0:
        apply = u[:, F_AFFINE] < options.affine
        sx = torch.where(apply, _between(u[:, F_SX], 1 - options.scale, 1 + options.scale), 1.0)
        sy = torch.where(apply, _between(u[:, F_SY], 1 - options.scale, 1 + options.scale), 1.0)
        angle = torch.where(apply, _between(u[:, F_ANGLE], -options.rotate, options.rotate), 0.0) * (math.pi / 180)
        # whole pixels, truncated towards zero, as albumentations' translate_percent
        tx = torch.trunc(
            torch.where(apply, _between(u[:, F_TX], -options.translate, options.translate), 0.0) * out_size
        )
        ty = torch.trunc(
            torch.where(apply, _between(u[:, F_TY], -options.translate, options.translate), 0.0) * out_size
        )
        cos, sin, c = torch.cos(angle), torch.sin(angle), out_size / 2 - 0.5
        affine = eye.clone()
        affine[:, 0, 0], affine[:, 0, 1] = cos * sx, sin * sy
        affine[:, 1, 0], affine[:, 1, 1] = -sin * sx, cos * sy
        # centre -> scale, rotate -> back to the centre, then translate
        affine[:, 0, 2] = c + tx - (affine[:, 0, 0] + affine[:, 0, 1]) * c
        affine[:, 1, 2] = c + ty - (affine[:, 1, 0] + affine[:, 1, 1]) * c
        matrix = affine @ matrix
    return Geometry(forward=matrix, flipped=flipped)


def _inverse_affine(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of affine [B, 3, 3] matrices in closed form (no linalg call, which may check the result on the
    host)."""
    a, b, c = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    d, e, f = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a * e - b * d
    inverse = torch.zeros_like(matrix)
    inverse[:, 0, 0], inverse[:, 0, 1] = e / det, -b / det
    inverse[:, 1, 0], inverse[:, 1, 1] = -d / det, a / det
    inverse[:, 0, 2] = -(inverse[:, 0, 0] * c + inverse[:, 0, 1] * f)
    inverse[:, 1, 2] = -(inverse[:, 1, 0] * c + inverse[:, 1, 1] * f)
    inverse[:, 2, 2] = 1.0
    return inverse


def _normalised_theta(forward: torch.Tensor, *, src_size: int, out_size: int) -> torch.Tensor:
    """``affine_grid``'s theta [B, 2, 3] (output → input, normalised, align_corners=False) for pixel matrix
    ``forward`` (input → output): theta = N_src · forward⁻¹ · N_out⁻¹ with N_s(x) = (2x + 1) / s − 1."""
    inverse = _inverse_affine(forward)  # output pixels -> source pixels
    # fold the two normalisations in: x_src_norm = (2 x_src + 1) / C - 1, x_out = ((u + 1) S - 1) / 2
    s_out, s_src = out_size, src_size
    theta = inverse[:, :2].clone()
    linear = theta[:, :, :2] * (s_out / s_src)  # d(x_src_norm)/d(u) = (2 / C) * a * (S / 2)
    offset = (2 / s_src) * (inverse[:, :2, :2].sum(dim=2) * ((s_out - 1) / 2) + inverse[:, :2, 2]) + 1 / s_src - 1
    # (the sum above: a·((S - 1)/2) + b·((S - 1)/2), the image of u = 0, i.e. pixel (S - 1) / 2)
    theta[:, :, :2], theta[:, :, 2] = linear, offset
    return theta


def warp_images(images: torch.Tensor, geo: Geometry, *, out_size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 NHWC ``images`` [B, C, C, 3] (or [B, C, C] masks) → float [B, 3, S, S] (or [B, S, S]) through
    ``geo``; image edges are replicated (cv2.BORDER_REPLICATE), mask edges are zero."""
    is_mask = images.dim() == 3
    x = images.unsqueeze(1).float() if is_mask else images.permute(0, 3, 1, 2).float()
    theta = _normalised_theta(geo.forward, src_size=images.shape[1], out_size=out_size)
    # affine_grid's sampling grid, built by broadcasting: its batched matmul with K = 3 was the slowest part of the
    # augmentation on a CPU
    steps = (torch.arange(out_size, device=x.device, dtype=theta.dtype) * 2 + 1) / out_size - 1  # pixel centres
    u, v = steps.view(1, 1, -1), steps.view(1, -1, 1)
    t = theta.view(-1, 6, 1, 1)
    grid = torch.stack([t[:, 0] * u + t[:, 1] * v + t[:, 2], t[:, 3] * u + t[:, 4] * v + t[:, 5]], dim=-1)
    padding = "zeros" if is_mask else "border"
    out = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.squeeze(1) if is_mask else out


def warp_points(points: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """[B, P, 2] source pixels → output pixels; on a flipped sample the left/right points swap (68 or 5 points)."""
    moved = points @ geo.forward[:, :2, :2].transpose(1, 2) + geo.forward[:, None, :2, 2]
    order = FLIP68 if points.shape[1] == 68 else FLIP5 if points.shape[1] == 5 else None
    if order is None:
        return moved
    return torch.where(geo.flipped.view(-1, 1, 1), moved[:, order], moved)


# ---------------------------------------------------------------------------------------------------------------------
# Photometric steps (on float images in 0..255, [B, 3, S, S])


def brightness_contrast(x: torch.Tensor, u: torch.Tensor, probability: float) -> torch.Tensor:
    """albumentations' RandomBrightnessContrast(0.2, 0.2): clip(x·α + β·255), α = 1 + U(-0.2, 0.2), β = U(-0.2, 0.2)."""
    if probability <= 0:
        return x
    apply = u[:, F_COLOR] < probability
    alpha = torch.where(apply, 1 + _between(u[:, F_CONTRAST], -0.2, 0.2), 1.0).view(-1, 1, 1, 1)
    beta = torch.where(apply, _between(u[:, F_BRIGHT], -0.2, 0.2) * 255, 0.0).view(-1, 1, 1, 1)
    return (x * alpha + beta).clamp(0, 255)


def gaussian_blur(x: torch.Tensor, u: torch.Tensor, probability: float) -> torch.Tensor:
    """Per-sample Gaussian blur, σ = U(0.1, 1.0) px, 7 taps, reflected border; other samples pass unchanged."""
    if probability <= 0:
        return x
    b, c, h, w = x.shape
    sigma = _between(u[:, F_SIGMA], 0.1, 1.0)
    taps = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (taps == 0).to(x.dtype).expand(b, -1)
    kernel = torch.where((u[:, F_BLUR] < probability).view(-1, 1), kernel, identity)  # [B, 7]
    weight = kernel.repeat_interleave(c, dim=0)  # [B*C, 7]
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 0, 0), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, 7), groups=b * c)
    y = F.pad(y, (0, 0, 3, 3), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 7, 1), groups=b * c)
    return y.view(b, c, h, w)


def _pixel_grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, device=device, dtype=torch.float32)
    return coords.view(1, -1, 1), coords.view(1, 1, -1)  # ys [1, S, 1], xs [1, 1, S]


def erasing_mask(u: torch.Tensor, probability: float, size: int) -> torch.Tensor | None:
    """[B, S, S] bool: 1-2 boxes of 10-25 % of the side per selected sample (albumentations' CoarseDropout)."""
    if probability <= 0:
        return None
    ys, xs = _pixel_grid(size, u.device)
    apply = u[:, F_ERASE] < probability
    holes = torch.where(u[:, F_HOLES] < 0.5, 1, 2)
    mask = torch.zeros(len(u), size, size, dtype=torch.bool, device=u.device)
    for k in range(2):
        base = 14 + 4 * k
        h = (_between(u[:, base], 0.1, 0.25) * size).floor()
        w = (_between(u[:, base + 1], 0.1, 0.25) * size).floor()
        y0 = (u[:, base + 2] * (size - h + 1)).floor()
        x0 = (u[:, base + 3] * (size - w + 1)).floor()
        inside = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + h).view(-1, 1, 1))
        inside = inside & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + w).view(-1, 1, 1))
        mask |= inside & (apply & (holes > k)).view(-1, 1, 1)
    return mask


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """0..255 float [B, 3, S, S] → ImageNet-normalised, as albumentations' Normalize (per channel, python scalars:
    no host-to-device copy)."""
    return torch.stack([(x[:, c] - 255 * mean[c]) / (255 * std[c]) for c in range(3)], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic occluders (the shapes of fer_bench.data.occluders, rasterised in torch)


def _segment_distance(px, py, ax, ay, bx, by) -> torch.Tensor:
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    return torch.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _ellipse_inside(xs, ys, cx, cy, a, b, angle) -> torch.Tensor:
    dx, dy = xs - cx, ys - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    along, across = (dx * cos + dy * sin) / a, (-dx * sin + dy * cos) / b
    return along * along + across * across <= 1


def occluder_masks(u: torch.Tensor, kinds: tuple[str, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, S] bool masks of one random occluder per sample, and each sample's kind index into ``OCCLUDER_KINDS``.

    Shapes and ranges as :func:`fer_bench.data.occluders.draw_occluder`: an ellipse or 3-6-gon object of 12-28 % of
    the side, a hand (palm plus four fingers), a bar 8-18 % thick across the face, a 25-50 % noise patch.
    """
    b, device = len(u), u.device
    ys, xs = _pixel_grid(size, device)

    def p(k: int) -> torch.Tensor:  # the k-th shape parameter, [B, 1, 1]
        return u[:, F_OCC + k].view(b, 1, 1)

    side = float(size)
    cx, cy = _between(p(0), 0.2, 0.8) * side, _between(p(1), 0.25, 0.85) * side
    # object: ellipse or polygon
    ellipse = _ellipse_inside(
        xs, ys, cx, cy, _between(p(3), 0.12, 0.25) * side, _between(p(4), 0.12, 0.25) * side, p(5) * math.pi
    )
    n_vertices = (3 + (p(6) * 4).floor()).clamp(max=6)  # 3..6
    angles = torch.sort(u[:, F_OCC + 7 : F_OCC + 13] * 2 * math.pi, dim=1).values  # [B, 6]
    radii = _between(u[:, F_OCC + 13 : F_OCC + 19], 0.12, 0.28) * side
    used = torch.arange(6, device=device).view(1, 6) < n_vertices.view(b, 1)
    last = (n_vertices.view(b).long() - 1).view(b, 1)
    # unused vertices repeat the last used one: zero-length edges cross nothing
    angles = torch.where(used, angles, angles.gather(1, last).expand(-1, 6))
    radii = torch.where(used, radii, radii.gather(1, last).expand(-1, 6))
    vx = cx.view(b, 1) + torch.cos(angles) * radii
    vy = cy.view(b, 1) + torch.sin(angles) * radii
    polygon = torch.zeros(b, size, size, dtype=torch.bool, device=device)
    n = n_vertices.view(b).long()
    for i in range(6):
        # edge i -> i+1; the last used vertex closes to vertex 0; unused vertices get zero-length edges
        j = torch.where(i < n - 1, i + 1, torch.where(n - 1 == i, 0, i)).view(b, 1)
        xi, yi = vx[:, i].view(b, 1, 1), vy[:, i].view(b, 1, 1)
        xj, yj = vx.gather(1, j).view(b, 1, 1), vy.gather(1, j).view(b, 1, 1)
        crosses = (yi > ys) != (yj > ys)
        x_at = (xj - xi) * (ys - yi) / torch.where(yj == yi, torch.ones_like(yj), yj - yi) + xi
        polygon ^= crosses & (xs < x_at)
    obj = torch.where(p(2) < 0.5, ellipse, polygon)
    # hand: palm ellipse and four fingers along a random direction
    angle = p(20) * 2 * math.pi
    along_x, along_y, across_x, across_y = torch.cos(angle), torch.sin(angle), -torch.sin(angle), torch.cos(angle)
    hand = _ellipse_inside(xs, ys, cx, cy, 0.13 * side, 0.10 * side, angle)
    finger_width = max(2, size // 20)
    for k in range(4):
        bx = cx + across_x * (k - 1.5) * 0.055 * side
        by = cy + across_y * (k - 1.5) * 0.055 * side
        length = _between(p(21 + k), 0.16, 0.22) * side
        hand |= _segment_distance(xs, ys, bx, by, bx + along_x * length, by + along_y * length) <= finger_width / 2
    # bar: a thick line through the centre
    thickness = torch.clamp((_between(p(25), 0.08, 0.18) * side).floor(), min=2)
    bar_angle = p(26) * math.pi
    bar = ((xs - cx) * torch.sin(bar_angle) - (ys - cy) * torch.cos(bar_angle)).abs() <= thickness / 2
    # patch: an axis-aligned rectangle
    ph, pw = (_between(p(27), 0.25, 0.5) * side).floor(), (_between(p(28), 0.25, 0.5) * side).floor()
    py0, px0 = (p(29) * (side - ph + 1)).floor(), (p(19) * (side - pw + 1)).floor()
    patch = (ys >= py0) & (ys < py0 + ph) & (xs >= px0) & (xs < px0 + pw)
    choice = (u[:, F_KIND] * len(kinds)).long().clamp(max=len(kinds) - 1)  # which of ``kinds``
    kind = torch.zeros_like(choice)
    for k, name in enumerate(kinds):  # as indices into OCCLUDER_KINDS, without a host-to-device copy
        kind = torch.where(choice == k, OCCLUDER_KINDS.index(name), kind)
    shapes = torch.stack([obj, hand, bar, patch], dim=1)  # in OCCLUDER_KINDS order
    return shapes.gather(1, kind.view(b, 1, 1, 1).expand(b, 1, size, size)).squeeze(1), kind


def noise_bank(size: int, *, tiles: int = 32, device=None) -> torch.Tensor:
    """[tiles, 3, S, S] standard normal textures, drawn once: an occluder's texture is one of them (chosen per sample
    by hash), which costs one gather per step instead of hashing every pixel of every image."""
    return pixel_normals(torch.arange(tiles, device=device), (3, size, size), stream=7)


def texture_index(keys: torch.Tensor, tiles: int) -> torch.Tensor:
    """Which :func:`noise_bank` tile each sample's occluder uses."""
    return hash32(keys ^ 0x5BD1E995) % tiles


def draw_occluders(
    x: torch.Tensor, u: torch.Tensor, noise: torch.Tensor, *, apply: torch.Tensor, kinds: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Occluders on the selected samples of float 0..255 ``x`` [B, 3, S, S]: (occluded images, masks [B, S, S] uint8).
    Objects and patches are textured (``noise`` [B, 3, S, S] standard normal, scaled to σ 5-40), hands
    skin-coloured, bars flat."""
    b, _, s, _ = x.shape
    mask, kind = occluder_masks(u, kinds, s)
    mask = mask & apply.view(b, 1, 1)
    colour = u[:, F_COLOUR : F_COLOUR + 3] * 255  # [B, 3]
    tone = (u[:, F_COLOUR + 3] * len(_SKIN)).long().clamp(max=len(_SKIN) - 1)
    skin = torch.zeros_like(colour)
    for k, rgb in enumerate(_SKIN):  # the palette as python numbers: no host-to-device copy per step
        skin = torch.where(
            (tone == k).view(b, 1), torch.stack([torch.full_like(tone, v, dtype=x.dtype) for v in rgb], 1), skin
        )
    skin = skin * _between(u[:, F_COLOUR + 4 : F_COLOUR + 5], 0.85, 1.1)
    hand = kind == OCCLUDER_KINDS.index("hand")
    colour = torch.where(hand.view(b, 1), skin, colour).view(b, 3, 1, 1)
    textured = (kind == OCCLUDER_KINDS.index("object")) | (kind == OCCLUDER_KINDS.index("patch"))
    strength = _between(u[:, F_COLOUR + 5], 5.0, 40.0) * textured.to(x.dtype)
    fill = (colour + noise * strength.view(b, 1, 1, 1)).clamp(0, 255)
    return torch.where(mask.unsqueeze(1), fill, x), mask.to(torch.uint8)
