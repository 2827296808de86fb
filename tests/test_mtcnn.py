"""MTCNN: the released facenet-pytorch weights load strictly, detections match facenet-pytorch's ``MTCNN.detect`` on
real photos, batching does not change results, and missing or corrupt weights fail in one line.

The reference code and the weights come from the facenet-pytorch 2.6.0 wheel (``mtcnn_wheel``), unpacked into a
temporary folder and imported from there, never installed.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.faces import mtcnn
from fer_bench.faces.detection import DETECTORS, Faces
from fer_bench.faces.weights import sha256_file
from tests.conftest import import_from_wheel

# Parity tolerances (the measured deviations are printed; on CPU they are 0).
BOX_TOL, SCORE_TOL, POINT_TOL = 0.5, 1e-4, 0.5


def grace_hopper() -> np.ndarray:
    """matplotlib's sample photo, RGB uint8 [600, 512, 3], one frontal face."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def photos() -> dict[str, np.ndarray]:
    """Real inputs of several sizes: one face, resized, two and six faces, a face cut by the border, no face."""
    face = grace_hopper()
    return {
        "grace_hopper": face,
        "resized_640x480": cv2.resize(face, (640, 480), interpolation=cv2.INTER_AREA),
        "two_faces": np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1)),
        "six_small_faces": np.tile(cv2.resize(face, (128, 150), interpolation=cv2.INTER_AREA), (2, 3, 1)),
        "cut_by_border": np.ascontiguousarray(face[150:400, 100:330]),
        "blank": np.full((300, 400, 3), 128, np.uint8),
    }


@pytest.fixture(scope="module")
def reference(mtcnn_wheel, tmp_path_factory):
    """facenet-pytorch's ``models.mtcnn`` module, imported from the unpacked wheel."""
    import_from_wheel(mtcnn_wheel, tmp_path_factory.mktemp("facenet_pytorch_ref"))
    from facenet_pytorch.models import mtcnn as reference_mtcnn

    return reference_mtcnn


@pytest.fixture(scope="module")
def detector(mtcnn_wheel) -> mtcnn.MTCNNDetector:
    return DETECTORS.get("mtcnn")(weights=str(mtcnn_wheel), device="cpu")


def reference_faces(model, image: np.ndarray) -> Faces:
    """The reference's detections as :class:`Faces`: boxes clipped to the image (ours are), most confident first."""
    boxes, probs, points = model.detect(image, landmarks=True)
    if boxes is None:
        return Faces()
    boxes, probs, points = (np.asarray(a, dtype=np.float32) for a in (boxes, probs, points))
    height, width = image.shape[:2]
    order = np.argsort(-probs, kind="stable")
    return Faces(boxes[order].clip(0, [width, height, width, height]), probs[order], points[order])


# ---------------------------------------------------------------------------------------------------------------------
# Networks and weights


def test_networks_load_released_weights_strictly(mtcnn_wheel, reference):
    weights = mtcnn.read_weights(mtcnn_wheel)
    for ours, theirs, state in (
        (mtcnn.PNet(), reference.PNet(pretrained=False), weights.pnet),
        (mtcnn.RNet(), reference.RNet(pretrained=False), weights.rnet),
        (mtcnn.ONet(), reference.ONet(pretrained=False), weights.onet),
    ):
        ours.load_state_dict(state, strict=True)
        expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
        assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_networks_compute_the_reference_outputs(mtcnn_wheel, reference):
    weights = mtcnn.read_weights(mtcnn_wheel)
    torch.manual_seed(0)
    for ours, theirs, state, size in (
        (mtcnn.PNet(), reference.PNet(pretrained=False), weights.pnet, 40),
        (mtcnn.RNet(), reference.RNet(pretrained=False), weights.rnet, 24),
        (mtcnn.ONet(), reference.ONet(pretrained=False), weights.onet, 48),
    ):
        ours.load_state_dict(state)
        theirs.load_state_dict(state)
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            mine, other = ours.eval()(x), theirs.eval()(x)
        # The reference returns (offsets, [landmarks,] two-class probabilities); ours the face probability first.
        torch.testing.assert_close(mine[0], other[-1][:, 1], rtol=0, atol=1e-6)
        for a, b in zip(mine[1:], other[:-1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_wheel_and_folder_give_the_same_weights(mtcnn_wheel, tmp_path):
    folder = tmp_path / "mtcnn"
    folder.mkdir()
    with zipfile.ZipFile(mtcnn_wheel) as archive:
        for name in mtcnn.NETWORK_FILES:
            (folder / name).write_bytes(archive.read(mtcnn.WHEEL_DATA + name))
    from_wheel, from_folder = mtcnn.read_weights(mtcnn_wheel), mtcnn.read_weights(folder)
    for net in ("pnet", "rnet", "onet"):
        a, b = getattr(from_wheel, net), getattr(from_folder, net)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_wheel.sha256 == sha256_file(mtcnn_wheel)
    concatenated = b"".join((folder / name).read_bytes() for name in mtcnn.NETWORK_FILES)
    assert from_folder.sha256 == hashlib.sha256(concatenated).hexdigest()
    assert from_folder.source == str(folder.resolve())


def test_weights_found_in_weights_dir_without_arguments(mtcnn_wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(mtcnn, "installed_package_data", lambda: None)
    monkeypatch.setenv("FER_BENCH_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "mtcnn").mkdir()
    assert mtcnn.resolve_weights(None) == tmp_path / "mtcnn"
    (tmp_path / mtcnn_wheel.name).write_bytes(mtcnn_wheel.read_bytes())
    assert mtcnn.resolve_weights(None) == tmp_path / mtcnn_wheel.name  # a wheel is preferred to the folder
    detector = DETECTORS.get("mtcnn")(weights=None)
    assert detector.describe()["weights_sha256"] == sha256_file(mtcnn_wheel)


def test_installed_package_is_found_without_importing_it(reference, monkeypatch):
    # The reference fixture put the unpacked wheel on sys.path, which is what an installed package looks like;
    # forget that it was imported, to see that finding its data does not import it again.
    for name in [name for name in sys.modules if name.split(".")[0] == "facenet_pytorch"]:
        monkeypatch.delitem(sys.modules, name)
    folder = mtcnn.installed_package_data()
    assert folder is not None and all((folder / name).is_file() for name in mtcnn.NETWORK_FILES)
    assert "facenet_pytorch" not in sys.modules


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(mtcnn, "installed_package_data", lambda: None)
    monkeypatch.setenv("FER_BENCH_WEIGHTS_DIR", str(tmp_path / "weights"))
    for weights in (None, str(tmp_path / "nowhere.whl")):
        with pytest.raises(WeightsUnavailableError) as caught:
            DETECTORS.get("mtcnn")(weights=weights)
        message = str(caught.value)
        assert "\n" not in message
        assert "pip download facenet-pytorch==2.6.0 --no-deps" in message
        assert str(tmp_path / "weights") in message and "--detector-weights" in message


@pytest.mark.parametrize("content", [b"", b"not a zip at all"])
def test_corrupt_wheel_is_one_line_naming_it(tmp_path, content):
    broken = tmp_path / "facenet_pytorch-2.6.0-py3-none-any.whl"
    broken.write_bytes(content)
    with pytest.raises(WeightsUnavailableError) as caught:
        DETECTORS.get("mtcnn")(weights=str(broken))
    assert "\n" not in str(caught.value) and str(broken) in str(caught.value)


def test_bad_folder_files_are_one_line_naming_them(mtcnn_wheel, tmp_path):
    with zipfile.ZipFile(mtcnn_wheel) as archive:
        data = {name: archive.read(mtcnn.WHEEL_DATA + name) for name in mtcnn.NETWORK_FILES}
    cases = {
        "empty": ({**data, "rnet.pt": b""}, "rnet.pt"),
        "missing": ({k: v for k, v in data.items() if k != "onet.pt"}, "onet.pt"),
        "swapped": ({**data, "pnet.pt": data["rnet.pt"]}, "not MTCNN PNet weights"),
    }
    for case, (files, expected) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        with pytest.raises(WeightsUnavailableError) as caught:
            DETECTORS.get("mtcnn")(weights=str(folder))
        assert "\n" not in str(caught.value) and expected in str(caught.value), case


def test_bad_settings_are_config_errors(mtcnn_wheel):
    for options in ({"factor": 1.0}, {"min_face_size": 0}, {"thresholds": (0.6, 0.7)}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            DETECTORS.get("mtcnn")(weights=str(mtcnn_wheel), **options)


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline pieces


def test_scale_pyramid():
    scales = mtcnn.scale_pyramid(600, 512, min_face_size=20, factor=0.709)
    assert scales[0] == pytest.approx(0.6) and np.allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 512 * scales[-1] >= 12 > 512 * scales[-1] * 0.709
    assert mtcnn.scale_pyramid(11, 500, min_face_size=12) == []


def test_area_resize_crops_equal_interpolate():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 90, 120), dtype=np.uint8))
    table = mtcnn.integral_image(image)
    windows = []
    for _ in range(40):
        y0, x0 = rng.integers(0, 80), rng.integers(0, 110)
        windows.append([y0, rng.integers(y0 + 1, 91), x0, rng.integers(x0 + 1, 121)])
    windows_t = torch.tensor(windows)
    for size in (mtcnn.RNET_SIZE, mtcnn.ONET_SIZE):
        crops = mtcnn.area_resize_crops(table, windows_t, size)
        for crop, (y0, y1, x0, x1) in zip(crops, windows, strict=True):
            expected = F.interpolate(image[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="area")[0]
            assert torch.equal(crop, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Detection


def test_detections_match_the_reference(detector, reference):
    model = reference.MTCNN(keep_all=True, select_largest=False)  # select_largest=False: ordered by probability
    measured = {}
    for name, image in photos().items():
        ours, theirs = detector.detect([image])[0], reference_faces(model, image)
        assert len(ours) == len(theirs), name
        deviation = (
            float(np.abs(ours.boxes - theirs.boxes).max(initial=0)),
            float(np.abs(ours.scores - theirs.scores).max(initial=0)),
            float(np.abs(ours.landmarks - theirs.landmarks).max(initial=0)),
        )
        measured[name] = (len(ours), *deviation)
        assert deviation[0] <= BOX_TOL and deviation[1] <= SCORE_TOL and deviation[2] <= POINT_TOL, (name, deviation)
    assert [n for n, _, _, _ in measured.values()] == [1, 1, 2, 6, 1, 0]
    for name, (count, box, score, point) in measured.items():
        print(
            f"mtcnn parity {name}: {count} faces, max |box| {box:.3g} px, |score| {score:.3g}, |landmark| {point:.3g}"
        )


def test_grace_hopper_face_and_landmark_order(detector):
    faces = detector.detect([grace_hopper()])[0]
    assert len(faces) == 1 and faces.scores[0] > 0.99
    (left_eye, right_eye, nose, mouth_left, mouth_right), box = faces.landmarks[0], faces.boxes[0]
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert np.all((faces.landmarks[0] >= box[:2]) & (faces.landmarks[0] <= box[2:]))


def test_batched_detection_equals_per_image(mtcnn_wheel, detector):
    inputs = photos()
    images = [inputs["grace_hopper"], inputs["resized_640x480"], inputs["blank"], inputs["two_faces"]]
    images += [inputs["resized_640x480"], inputs["grace_hopper"]]
    alone = [detector.detect([image])[0] for image in images]
    small_batches = DETECTORS.get("mtcnn")(weights=str(mtcnn_wheel), batch_size=2)
    for batched in (detector.detect(images), small_batches.detect(images)):
        assert [len(f) for f in batched] == [len(f) for f in alone] == [1, 1, 0, 2, 1, 1]
        for together, single in zip(batched, alone, strict=True):
            np.testing.assert_allclose(together.boxes, single.boxes, rtol=0, atol=1e-4)
            np.testing.assert_allclose(together.scores, single.scores, rtol=0, atol=1e-6)
            np.testing.assert_allclose(together.landmarks, single.landmarks, rtol=0, atol=1e-4)


def test_small_empty_and_invalid_images(detector):
    faces = detector.detect([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)])
    assert [len(f) for f in faces] == [0, 0]
    assert detector.detect([]) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([np.zeros((32, 32, 3), np.float32)])


def test_describe(detector, mtcnn_wheel):
    described = detector.describe()
    assert described["detector"] == "mtcnn" and described["weights_sha256"] == sha256_file(mtcnn_wheel)
    assert described["weights_source"] == str(Path(mtcnn_wheel).resolve())
    assert described["thresholds"] == [0.6, 0.7, 0.7] and described["min_face_size"] == 20
