"""The device-side loader against the albumentations path: the same options give the same distributions (flip rate,
rotation, scale and translation measured on landmarks), heatmaps follow the image, occluders carry their masks, and
a sample's augmentation depends on its position in the epoch's order only (not on rank, batch or residency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fer_bench.data import FaceDataset, create_transform, get_dataset
from fer_bench.data import device_augment as DA
from fer_bench.data.au_maps import CODEBOOK, draw_au_map, expression_au_mask, template_landmarks
from fer_bench.data.cache import cached_dataset
from fer_bench.data.dataset import flip_landmarks
from fer_bench.data.device_loader import DeviceLoader
from fer_bench.data.transforms import AugmentOptions
from fer_bench.runtime import derive_seed

OPTIONS = AugmentOptions(hflip=0.5, affine=0.7, rotate=10.0, scale=0.1, translate=0.06, color=0.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(tiny_synthfer, tmp_path_factory):
    info = get_dataset("synthfer", tiny_synthfer)
    return cached_dataset(info, cache=str(tmp_path_factory.mktemp("c") / "cache"), size=32, message=lambda m: None)


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares dst ≈ src @ A.T + t; returns ([2, 3] matrix, RMS residual in pixels)."""
    design = np.hstack([src, np.ones((len(src), 1))])
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    residual = float(np.sqrt(((design @ solution - dst) ** 2).sum(axis=1).mean()))
    return solution.T, residual


def _measure(src: np.ndarray, moved: np.ndarray, size: int) -> dict[str, float]:
    """Flip, rotation (deg), x/y scale and translation (fraction of the side) of one sample from its 68 points."""
    plain, r_plain = _fit_affine(src, moved)
    mirrored, r_mirror = _fit_affine(flip_landmarks(src, size), moved)
    flipped = r_mirror < r_plain
    m = mirrored if flipped else plain
    a = m[:, :2]  # [[c sx, s sy], [-s sx, c sy]]
    sx, sy = np.hypot(a[0, 0], a[1, 0]), np.hypot(a[0, 1], a[1, 1])
    angle = math.degrees(math.atan2(-a[1, 0], a[0, 0]))
    c = size / 2 - 0.5
    centre = m @ np.array([c, c, 1.0])
    return {"flip": float(flipped), "angle": angle, "sx": sx, "sy": sy, "tx": (centre[0] - c) / size}


def _stats(rows: list[dict[str, float]]) -> dict[str, float]:
    angle = np.array([r["angle"] for r in rows])
    sx = np.array([r["sx"] for r in rows])
    tx = np.array([r["tx"] for r in rows])
    moved = (np.abs(angle) > 1e-3) | (np.abs(sx - 1) > 1e-4)
    return {
        "flip_rate": float(np.mean([r["flip"] for r in rows])),
        "affine_rate": float(moved.mean()),
        "angle_max": float(np.abs(angle).max()),
        "angle_mean_abs": float(np.abs(angle[moved]).mean()),
        "scale_min": float(sx.min()),
        "scale_max": float(sx.max()),
        "scale_std": float(sx[moved].std()),
        "shift_max": float(np.abs(tx).max()),
    }


def test_geometry_matches_albumentations_in_distribution():
    size, n = 64, 1200
    # an asymmetric face (the template jittered by ~2 px), so a flip cannot pass for no flip in the fit
    jitter = np.random.default_rng(0).normal(0, 2.0, (68, 2))
    points = (template_landmarks(size) + jitter).astype(np.float32)
    # albumentations: the dataset flips, the pipeline resizes and applies Affine; landmarks ride along as keypoints
    import pandas as pd

    rows = pd.DataFrame(
        {
            "image_id": [f"x{i}" for i in range(n)],
            "path": [""] * n,
            "split": ["train"] * n,
            "label": [1] * n,
            "array_index": [0] * n,
            "landmarks": [points.reshape(-1).tolist()] * n,
        }
    )
    dataset = FaceDataset(
        rows,
        root=".",
        transform=create_transform(train=True, img_size=size, augment=OPTIONS),
        hflip=OPTIONS.hflip,
        seed=3,
        return_landmarks=True,
        image_array=np.zeros((1, size, size, 3), np.uint8),
    )
    cpu = [_measure(points, dataset[i]["landmarks"].numpy(), size) for i in range(n)]
    # the device path: the same options through the loader's geometry and point warp
    keys = DA.sample_keys(torch.arange(n), base=12345)
    geo = DA.geometry(DA.uniforms(keys, DA._FIELDS), OPTIONS, src_size=size, out_size=size, train=True)
    moved = DA.warp_points(torch.as_tensor(points).expand(n, 68, 2), geo).numpy()
    dev = [_measure(points, moved[i], size) for i in range(n)]
    a, b = _stats(cpu), _stats(dev)
    assert abs(a["flip_rate"] - 0.5) < 0.05 and abs(b["flip_rate"] - 0.5) < 0.05, (a, b)
    assert abs(a["affine_rate"] - 0.7) < 0.05 and abs(b["affine_rate"] - 0.7) < 0.05, (a, b)
    for s in (a, b):  # the ranges: ±10°, 1 ± 0.1, ± 6 % shifts in whole pixels (3 px at 64 px)
        assert 9.0 < s["angle_max"] <= 10.05 and 0.895 <= s["scale_min"] < 0.91 and 1.09 < s["scale_max"] <= 1.105
        assert s["shift_max"] == pytest.approx(3 / size, abs=0.2 / size)
    assert abs(a["angle_mean_abs"] - b["angle_mean_abs"]) < 0.5  # uniform: 5° on both
    assert abs(a["scale_std"] - b["scale_std"]) < 0.01  # uniform on ±0.1: 0.058 on both


def test_eval_batches_equal_the_evaluator_pipeline(cached):
    loader = DeviceLoader(cached, "test", device=CPU, img_size=32, batch_size=16, train=False)
    batch = next(iter(loader))
    dataset = FaceDataset.from_info(cached, "test", transform=create_transform(train=False, img_size=32))
    expected = torch.stack([dataset[i]["image"] for i in range(16)])
    torch.testing.assert_close(batch["image"], expected, atol=2e-5, rtol=0)
    assert batch["label"].tolist() == dataset.labels[:16].tolist()


def test_validation_from_a_larger_cache_sees_the_evaluators_pixels(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    big = cached_dataset(info, cache=str(tmp_path / "c48"), size=48, message=lambda m: None)
    loader = DeviceLoader(big, "val", device=CPU, img_size=32, batch_size=32, train=False)
    batch = next(iter(loader))
    dataset = FaceDataset.from_info(big, "val", transform=create_transform(train=False, img_size=32))
    expected = torch.stack([dataset[i]["image"] for i in range(32)])
    torch.testing.assert_close(batch["image"], expected, atol=2e-5, rtol=0)  # cv2 INTER_AREA, as the evaluator


def test_a_sample_is_augmented_alike_on_any_rank_and_residency(cached):
    common = dict(device=CPU, img_size=32, augment=AugmentOptions(color=0.5, blur=0.3, erasing=0.3), seed=4)
    one = DeviceLoader(cached, "train", batch_size=16, **common)
    one.set_epoch(2)
    first = list(one.iterate(0))[:3]
    halves = []
    for rank, residency in ((0, "device"), (1, "mmap")):
        loader = DeviceLoader(cached, "train", batch_size=16, rank=rank, world_size=2, residency=residency, **common)
        loader.set_epoch(2)
        assert loader.residency == residency and loader.local_batch == 8
        halves.append(list(loader.iterate(0))[:3])
    for step in range(3):
        merged = torch.empty_like(first[step]["image"])
        merged[0::2], merged[1::2] = halves[0][step]["image"], halves[1][step]["image"]
        torch.testing.assert_close(merged, first[step]["image"], rtol=0, atol=0)  # the same bytes
    resumed = next(one.iterate(2))  # a resume at step 2 replays step 2
    torch.testing.assert_close(resumed["image"], first[2]["image"], rtol=0, atol=0)
    one.set_epoch(3)
    assert not torch.equal(next(one.iterate(0))["image"], first[0]["image"])


def test_heatmaps_follow_the_image_and_agree_with_the_cpu_maps(cached):
    loader = DeviceLoader(
        cached, "train", device=CPU, img_size=32, batch_size=32, augment=OPTIONS, seed=1, heatmaps="codebook"
    )
    batch = next(iter(loader))
    names = cached.label_space.names
    rows = loader.rows
    order = loader.order()
    index, positions = loader.step_rows(order, 0)
    keys = DA.sample_keys(torch.as_tensor(positions), derive_seed(1, "augment", 0))
    geo = DA.geometry(DA.uniforms(keys, DA._FIELDS), OPTIONS, src_size=32, out_size=32, train=True)
    checked = 0
    for k, row in enumerate(index):
        label = names[int(rows.at[int(row), "label"])]
        if not CODEBOOK[label]:
            assert not batch["heatmap_valid"][k] and float(batch["heatmap"][k].abs().max()) == 0
            continue
        assert batch["heatmap_valid"][k] and batch["heatmap_source"][k] == 1  # SynthFER's own 68 points
        points = np.asarray(rows.at[int(row), "landmarks"], np.float32).reshape(68, 2)
        # the map drawn on the un-augmented face, warped like the image, is the map drawn on the moved points
        still = torch.as_tensor(draw_au_map(points, CODEBOOK[label], 32))
        one = DA.Geometry(forward=geo.forward[k : k + 1], flipped=geo.flipped[k : k + 1])
        warped = DA.warp_images((still * 255).unsqueeze(0), one, out_size=32).squeeze(0) / 255
        device_map = batch["heatmap"][k]
        cos = float((warped * device_map).sum() / (warped.norm() * device_map.norm()))
        assert cos > 0.9, (k, label, cos)
        moved = DA.warp_points(torch.as_tensor(points)[None], one)[0].numpy()
        cpu = draw_au_map(moved, CODEBOOK[label], 32)
        cos_cpu = float((cpu * device_map.numpy()).sum() / (np.linalg.norm(cpu) * device_map.norm().item()))
        assert cos_cpu > 0.97, (k, label, cos_cpu)
        checked += 1
    assert checked >= 20


def test_torch_maps_agree_with_cv2_maps_at_every_size():
    rng = np.random.default_rng(0)
    names = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
    table = expression_au_mask(names)
    for size in (32, 64, 224):
        for _ in range(6):
            angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
            centre = np.array([size / 2, size / 2])
            points = (template_landmarks(size) - centre) @ rotation.T + centre
            label = int(rng.integers(1, 7))
            cpu = draw_au_map(points, CODEBOOK[names[label]], size)
            maps, valid = DA_maps(points, table[[label]], size)
            cos = float((maps[0].numpy() * cpu).sum() / (np.linalg.norm(cpu) * maps[0].norm().item()))
            assert valid[0] and cos > 0.98, (size, names[label], cos)


def DA_maps(points, mask, size):
    from fer_bench.data.au_maps import draw_au_maps

    return draw_au_maps(torch.as_tensor(points[None], dtype=torch.float32), mask, size)


def test_occluders_carry_their_masks_and_spare_known_occlusions(cached):
    loader = DeviceLoader(
        cached,
        "train",
        device=CPU,
        img_size=32,
        batch_size=96,
        augment=AugmentOptions(hflip=0.5, affine=0.0, color=0.0),
        seed=2,
        occlusion_augment=0.8,
        occlusion_masks=True,
    )
    batch = next(iter(loader))
    image, clean, mask = batch["image"], batch["clean_image"], batch["occlusion"].bool()
    known = ~batch["has_clean"]
    assert known.any() and (~known).any()
    drawn = (~known) & mask.flatten(1).any(dim=1)
    assert 0.6 < drawn.float().sum() / (~known).float().sum() <= 1.0  # about 80 % of the clean rows
    coverage = mask[drawn].float().flatten(1).mean(dim=1)
    assert (
        coverage.min() > 0.005 and coverage.max() < 0.6 and 0.06 < coverage.mean() < 0.3
    )  # a thin polygon can be tiny
    outside = (~mask).unsqueeze(1).expand_as(image)
    torch.testing.assert_close(image[outside], clean[outside])  # the occluder changes only its own pixels
    assert (image - clean).abs().flatten(1).amax(dim=1)[drawn].min() > 0
    # a row the dataset marks as occluded keeps its own mask and gets no synthetic occluder
    assert torch.equal(image[known], clean[known]) and mask[known].flatten(1).any(dim=1).all()
    kinds = DA.occluder_masks(DA.uniforms(torch.arange(4000), DA._FIELDS), ("object", "hand", "bar", "patch"), 32)[1]
    assert torch.bincount(kinds, minlength=4).min() > 800  # each kind about a quarter


def test_photometric_ranges():
    keys = torch.arange(4000)
    u = DA.uniforms(keys, DA._FIELDS)
    x = torch.full((4000, 3, 8, 8), 100.0)
    y = DA.brightness_contrast(x, u, 0.5)
    changed = (y - x).abs().flatten(1).amax(dim=1) > 1e-4
    assert 0.45 < changed.float().mean() < 0.55
    values = y[:, 0, 0, 0][changed]  # 100 α + 255 β with α ∈ [0.8, 1.2], β ∈ [-0.2, 0.2]
    assert values.min() >= 80 - 51 - 1e-3 and values.max() <= 120 + 51 + 1e-3
    erase = DA.erasing_mask(u, 0.5, 32)
    hit = erase.flatten(1).any(dim=1)
    assert 0.45 < hit.float().mean() < 0.55
    share = erase[hit].float().flatten(1).mean(dim=1)
    assert share.min() >= 9 / 32**2 - 1e-6 and share.max() <= 2 * 0.25**2 + 1e-6  # 3 px to 8 px sides at 32 px
    blurred = DA.gaussian_blur(torch.rand(64, 3, 16, 16) * 255, u[:64], 1.0)
    assert torch.isfinite(blurred).all()
    uniform = DA.uniforms(keys, 4).flatten()
    assert 0.49 < float(uniform.mean()) < 0.51 and float(uniform.min()) >= 0 and float(uniform.max()) < 1
