"""Five-point alignment: the least-squares similarity, the torch warp against cv2, landmarks through the crop,
the 68-point fit, and IoU tracks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fer_bench.errors import UnknownNameError
from fer_bench.faces import (
    IoUTracker,
    alignment_matrices,
    fit_68_from_5,
    five_from_68,
    get_template,
    list_templates,
    transform_points,
    umeyama,
    warp_faces,
    warp_image,
)
from fer_bench.faces.align import MEAN_SHAPE_68, antialias_factor


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_templates_are_named_and_scale_with_the_crop():
    assert set(list_templates()) == {"arcface112", "arcface224", "rafdb_like", "ffhq512"}
    arc112, arc224 = get_template("arcface112"), get_template("arcface224")
    # insightface: 224 is the 112 template times 2 (in point coordinates)
    np.testing.assert_allclose(np.asarray(arc224.points), 2 * np.asarray(arc112.points))
    # one rule for every size (insightface's estimate_norm: size / 112), so arcface112 at 224 is arcface224
    np.testing.assert_allclose(arc112.at(224), arc224.at(224), atol=1e-5)
    with pytest.raises(UnknownNameError, match="arcface112"):
        get_template("arcface111")


@pytest.mark.parametrize("name", list_templates())
def test_every_template_is_a_face_in_its_crop(name):
    template = get_template(name)
    points = template.at(template.size)
    assert points.shape == (5, 2) and (points > 0).all() and (points < template.size).all()
    assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # image-left first
    assert points[:2, 1].max() < points[2, 1] < points[3:, 1].min()  # eyes above nose above mouth


def test_umeyama_recovers_a_known_similarity_exactly():
    rng = np.random.default_rng(0)
    reference = get_template("arcface112").at(112)
    for _ in range(20):
        truth = _similarity(rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5), rng.uniform(-300, 300, 2))
        face = transform_points(reference[None], np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[None, :2])[0]
        matrix = alignment_matrices(face[None], template="arcface112", size=112)
        np.testing.assert_allclose(matrix[0].numpy(), truth, rtol=1e-4, atol=1e-3)
        assert np.abs(transform_points(face[None], matrix)[0] - reference).max() < 1e-3


def test_umeyama_is_the_least_squares_optimum_and_batches():
    rng = np.random.default_rng(1)
    faces = rng.uniform(0, 200, (8, 5, 2)).astype(np.float32)
    target = get_template("arcface224").at(224)
    batch = umeyama(torch.from_numpy(faces), torch.from_numpy(target))
    for k in range(len(faces)):
        single = umeyama(torch.from_numpy(faces[k]), torch.from_numpy(target))[0]
        torch.testing.assert_close(batch[k], single)
        # cv2's 4-DoF fit with every point an inlier is the same least-squares problem
        cv_matrix, inliers = cv2.estimateAffinePartial2D(faces[k], target, ransacReprojThreshold=1e6)
        assert inliers.all()
        np.testing.assert_allclose(batch[k].numpy(), cv_matrix, rtol=1e-3, atol=1e-2)
        # no nearby similarity fits better
        best = np.square(transform_points(faces[k][None], batch[k][None])[0] - target).sum()
        for _ in range(10):
            nudged = batch[k].numpy() + rng.normal(0, 1e-2, (2, 3))
            nudged[1, :2] = [-nudged[0, 1], nudged[0, 0]]  # keep it a similarity
            assert np.square(transform_points(faces[k][None], nudged[None])[0] - target).sum() >= best - 1e-3


def test_a_mirror_image_is_never_fitted():
    reference = get_template("arcface112").at(112)
    mirrored = reference.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    matrix = umeyama(torch.from_numpy(mirrored), torch.from_numpy(reference))[0].numpy()
    assert np.linalg.det(matrix[:, :2]) > 0  # a rotation, not a reflection


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(image, (5, 5), 1.5)


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (0.4, 1.6), (-0.3, 0.7), (1.2, 3.1)])
def test_torch_warp_matches_cv2_warpaffine(angle, scale):
    image = _textured(150, 190)
    matrix = _similarity(angle, scale, (-60, 25))
    expected = cv2.warpAffine(image, matrix, (96, 96), flags=cv2.INTER_LINEAR, borderValue=0)
    np.testing.assert_array_equal(warp_image(image, matrix, 96, antialias=False), expected)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    got = warp_faces(tensor, torch.tensor(matrix)[None], torch.tensor([0]), 96, antialias=False)
    got = got[0].permute(1, 2, 0).numpy().astype(int)
    difference = np.abs(got - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # cv2 rounds its weights to 1/32 px


def test_batched_warp_equals_single_warps_and_antialias_agrees_with_cv2():
    images = torch.from_numpy(np.stack([_textured(200, 240, seed) for seed in range(3)])).permute(0, 3, 1, 2)
    matrices = torch.tensor(np.stack([_similarity(0.1 * k, [0.3, 1.0, 0.2, 2.0][k], (5, 9)) for k in range(4)]))
    index = torch.tensor([0, 2, 1, 2])
    batch = warp_faces(images, matrices, index, 64)
    for k in range(4):
        single = warp_faces(images[index[k] : index[k] + 1], matrices[k : k + 1], torch.tensor([0]), 64)
        torch.testing.assert_close(batch[k], single[0])
        # the antialiased CPU path (INTER_AREA, then the warp) and the torch path agree
        image = images[index[k]].permute(1, 2, 0).numpy()
        expected = warp_image(np.ascontiguousarray(image), matrices[k].numpy(), 64).astype(int)
        assert np.abs(batch[k].permute(1, 2, 0).numpy().astype(int) - expected).mean() < 0.5
    assert [antialias_factor(m) for m in matrices.numpy()] == [2, 1, 3, 1]  # then >= 0.5 crop px per source px


def test_antialias_removes_aliasing_of_a_large_face():
    stripes = np.zeros((400, 400, 3), np.uint8)
    stripes[:, ::2] = 255  # a 1-px grating: its true average is grey
    matrix = _similarity(0.0, 0.21, (0, 0))
    plain = warp_image(stripes, matrix, 64, antialias=False)[8:56, 8:56].astype(float)
    smooth = warp_image(stripes, matrix, 64)[8:56, 8:56].astype(float)
    # a box filter is not an ideal low-pass: an odd factor leaves a trace of a 1-px grating, 7x weaker
    assert plain.std() > 60 and smooth.std() < plain.std() / 5 and abs(smooth.mean() - 127.5) < 3


def test_landmarks_move_with_the_crop_on_synthfer(tiny_synthfer):
    """Alignment undoes a pose change exactly: a SynthFER face, rotated, scaled and shifted by a known similarity
    (image and landmarks), aligns to the same crop and the same landmarks as the original."""
    from fer_bench.data import get_dataset
    from fer_bench.data.manifest import landmarks_array

    info = get_dataset("synthfer", tiny_synthfer)
    rows = info.manifest.head(6)
    for path, cell in zip(rows["path"], rows["landmarks"], strict=True):
        image = cv2.cvtColor(cv2.imread(str(tiny_synthfer / path)), cv2.COLOR_BGR2RGB)
        points = landmarks_array(cell)
        pose = _similarity(0.35, 1.8, (20, 5))
        moved_image = cv2.warpAffine(image, pose, (100, 100), flags=cv2.INTER_LINEAR)
        moved_points = transform_points(points[None], pose[None])[0]
        crops, aligned = [], []
        for img, pts in ((image, points), (moved_image, moved_points)):
            matrix = alignment_matrices(five_from_68(pts)[None], template="arcface112", size=64)[0].numpy()
            crops.append(warp_image(img, matrix, 64).astype(int))
            aligned.append(transform_points(pts[None], matrix[None])[0])
        assert np.abs(aligned[0] - aligned[1]).max() < 0.5  # within 0.5 px of each other
        assert np.abs(crops[0] - crops[1])[8:56, 8:56].mean() < 6  # the same face (interpolated twice)
        # and the five points sit on the template up to the face's own shape (SynthFER identities vary)
        residual = np.abs(five_from_68(aligned[0]) - get_template("arcface112").at(64))
        assert residual.mean() < 2.0


def test_68_points_fitted_from_5():
    five = get_template("arcface224").at(224)[None]
    fitted = fit_68_from_5(five)
    assert fitted.shape == (1, 68, 2)
    # the fit's own five points land near the given ones (rigid shape: a few pixels at 224)
    assert np.abs(five_from_68(fitted[0]) - five[0]).max() < 8
    # and the shape is the mean shape moved by one similarity: distances scale uniformly
    d_mean = np.linalg.norm(MEAN_SHAPE_68[36] - MEAN_SHAPE_68[45])
    d_fit = np.linalg.norm(fitted[0, 36] - fitted[0, 45])
    d_mean2 = np.linalg.norm(MEAN_SHAPE_68[8] - MEAN_SHAPE_68[27])
    d_fit2 = np.linalg.norm(fitted[0, 8] - fitted[0, 27])
    assert d_fit / d_mean == pytest.approx(d_fit2 / d_mean2, rel=1e-4)
    # eyebrows above eyes above mouth above chin, in the image frame
    assert fitted[0, 19, 1] < fitted[0, 37, 1] < fitted[0, 62, 1] < fitted[0, 8, 1]


def test_tracker_keeps_ids_through_crossing_and_gaps():
    tracker = IoUTracker(min_iou=0.3, max_missed=2)
    a, b = np.array([0, 0, 20, 20.0]), np.array([100, 0, 120, 20.0])
    ids = [tracker.update(np.stack([a, b])).tolist()]
    for step in range(1, 6):  # both drift right; detection order swaps every frame
        boxes = np.stack([a + [step * 3, 0, step * 3, 0], b + [step * 3, 0, step * 3, 0]])
        order = [1, 0] if step % 2 else [0, 1]
        got = tracker.update(boxes[order])
        ids.append(np.asarray(got)[np.argsort(order)].tolist())
    assert all(frame == [0, 1] for frame in ids)
    assert tracker.update(np.zeros((0, 4))).tolist() == []  # a frame without faces
    assert tracker.update((a + [18, 0, 18, 0])[None]).tolist() == [0]  # back after one missed frame
    for _ in range(3):
        tracker.update(np.zeros((0, 4)))
    assert tracker.update((a + [18, 0, 18, 0])[None]).tolist() == [2]  # gone too long: a new id
