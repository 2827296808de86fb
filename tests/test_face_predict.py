"""Faces end to end with the released MTCNN weights: ``ferbench predict`` on a real photograph and on a video,
``ferbench data prepare`` with a detector, and the bad inputs (one line, exit code 2, no traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.faces import create_detector, list_detectors
from fer_bench.faces.detection import WEIGHT_IDENTITIES
from fer_bench.train import recipe_from_dict
from tests.conftest import tiny_recipe_dict
from tests.test_cli import COMMAND_TREE, _one_line_error

runner = CliRunner()


def grace_hopper() -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_synthfer, tmp_path_factory) -> Path:
    """A 1-epoch model on 32-px SynthFER: its checkpoint records SynthFER's framing for new faces."""
    out = tmp_path_factory.mktemp("tiny_run")
    recipe = out / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, out, **{"optim.epochs": 1})))
    result = runner.invoke(app, ["train", str(recipe), "--set", "tracking.enabled=false"])
    assert result.exit_code == 0, result.output
    return out / "run" / "best.pt"


def test_the_checkpoint_records_its_framing(tiny_checkpoint):
    import torch

    framing = torch.load(tiny_checkpoint, weights_only=True)["face_framing"]
    assert framing["alignment"] is None and framing["template"] == "synthfer_framing" and framing["size"] == 32
    points = np.asarray(framing["points"])
    assert points.shape == (5, 2) and points[0, 0] < points[1, 0] and points[:2, 1].max() < points[3:, 1].min()


def test_predict_on_a_real_photograph(tiny_checkpoint, mtcnn_wheel, tmp_path):
    out, overlay = tmp_path / "faces.csv", tmp_path / "overlay"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--images", str(grace_hopper())]
    args += ["--detector-weights", str(mtcnn_wheel), "--out", str(out), "--overlay", str(overlay)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert len(table) == 1  # exactly one face
    face = table.iloc[0]
    assert face["left_eye_x"] < face["right_eye_x"]
    assert (
        max(face["left_eye_y"], face["right_eye_y"]) < face["nose_y"] < min(face["mouth_left_y"], face["mouth_right_y"])
    )
    assert face["x1"] < face["left_eye_x"] < face["x2"] and face["y1"] < face["nose_y"] < face["y2"]
    probabilities = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    assert probabilities.shape[1] == 8 and abs(probabilities.sum() - 1) < 1e-4
    assert face["label"] == table.columns[table.columns.str.startswith("p_")][probabilities.argmax()][2:]
    assert face["score"] > 0.9 and face["detector"] == "mtcnn" and face["framing"] == "synthfer_framing"
    assert face["face_id"] == 0 and face["frame"] == 0 and pd.isna(face["timestamp"])
    assert face["face_px"] > 100 and not face["small"]
    assert face["overlay"] == "grace_hopper.overlay.jpg"
    drawn = cv2.imread(str(overlay / "grace_hopper.overlay.jpg"))
    original = cv2.imread(str(grace_hopper()))
    assert drawn.shape == original.shape and np.abs(drawn.astype(int) - original).mean() > 1  # boxes, labels, bars
    # parquet, and the same face
    result = runner.invoke(app, args[:-4] + ["--out", str(tmp_path / "faces.parquet")])
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(tmp_path / "faces.parquet")
    np.testing.assert_allclose(again[["x1", "y1", "x2", "y2"]].to_numpy(), table[["x1", "y1", "x2", "y2"]], atol=1e-3)


def _synthfer_faces(root: Path, count: int) -> list[np.ndarray]:
    from fer_bench.data import get_dataset
    from fer_bench.data.synthfer import render_image

    info = get_dataset("synthfer", root)
    config = info.extras["synth_config"]
    return [render_image(config, image_id) for image_id in info.manifest["image_id"][:count]]


def test_predict_on_a_video_keeps_track_ids(tiny_checkpoint, tiny_synthfer, mtcnn_wheel, tmp_path):
    from fer_bench.faces import create_detector

    detector = create_detector("mtcnn", weights=str(mtcnn_wheel))
    faces = [cv2.resize(f, (120, 120), interpolation=cv2.INTER_CUBIC) for f in _synthfer_faces(tiny_synthfer, 24)]
    found = [len(d) == 1 and d.scores[0] > 0.95 for d in detector.detect(faces)]
    left, right = (faces[k] for k in np.nonzero(found)[0][:2])  # two faces the detector sees clearly
    path, fps, frames = tmp_path / "clip.mp4", 10.0, 12
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (400, 200))
    for k in range(frames):  # the faces drift towards each other, 3 px a frame
        canvas = np.full((200, 400, 3), 90, np.uint8)
        canvas[40:160, 20 + 3 * k : 140 + 3 * k] = left
        canvas[40:160, 260 - 3 * k : 380 - 3 * k] = right
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    out, overlay = tmp_path / "video.csv", tmp_path / "overlay"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--video", str(path), "--batch-size", "5"]
    result = runner.invoke(
        app, args + ["--detector-weights", str(mtcnn_wheel), "--out", str(out), "--overlay", str(overlay)]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert sorted(table["frame"].unique()) == list(range(frames))
    np.testing.assert_allclose(table["timestamp"], table["frame"] / fps, atol=1e-6)
    assert len(table) == 2 * frames
    table["side"] = np.where(table["x1"] < 200, "left", "right")
    ids = table.groupby("side")["face_id"].unique()
    assert [len(v) for v in ids] == [1, 1] and ids["left"][0] != ids["right"][0]  # one id per face, all along
    assert set(table["overlay"]) == {"clip.overlay.mp4"}
    video = cv2.VideoCapture(str(overlay / "clip.overlay.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames


def test_prepare_with_a_detector_counts_every_outcome(tiny_checkpoint, mtcnn_wheel, tmp_path):
    """A folder dataset with one face, no face and two faces: each outcome is counted; the aligned cache trains."""
    photo = cv2.imread(str(grace_hopper()))
    root = tmp_path / "faces"
    for split in ("train", "test"):
        (root / split / "happy").mkdir(parents=True)
        (root / split / "neutral").mkdir(parents=True)
        cv2.imwrite(str(root / split / "happy" / "one.jpg"), photo)
        cv2.imwrite(str(root / split / "neutral" / "none.jpg"), np.full((300, 300, 3), 128, np.uint8))
        small = cv2.resize(photo, None, fx=0.6, fy=0.6)
        small = np.pad(small, ((0, photo.shape[0] - small.shape[0]), (0, 0), (0, 0)))
        two = np.concatenate([photo, small], axis=1)  # the photo and a smaller copy beside it
        cv2.imwrite(str(root / split / "happy" / "two.jpg"), two)
    cache = tmp_path / "cache"
    args = ["data", "prepare", "--dataset", "folder", "--root", str(root), "--align", "arcface112", "--size", "64"]
    result = runner.invoke(app, args + ["--detector-weights", str(mtcnn_wheel), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    card = yaml.safe_load((cache / "cache.yaml").read_text())
    record = card["alignment"]
    assert record["outcomes"] == {"one face": 2, "dropped: no face": 2, "several faces: kept the largest": 2}
    assert record["detector"] == "mtcnn" and len(record["weights_sha256"]) == 64 and record["template"] == "arcface112"
    assert card["counts"] == {"train": 2, "test": 2} and card["dropped"]["no face"] == 2
    assert record["dropped_by_split"] == {"train": {"no face": 1}, "test": {"no face": 1}}
    rows = pd.read_parquet(cache / "rows.parquet")
    assert (rows["face_score"] > 0.9).all() and set(rows["faces_found"]) == {1, 2}
    # the largest face of the pair is the full-size one, on the left
    assert all(box[0] < photo.shape[1] for box in rows["face_box"])
    result = runner.invoke(app, ["data", "describe", "--cache", str(cache)])
    assert result.exit_code == 0 and "arcface112 (mtcnn landmarks" in result.output, result.output
    # a model trained on SynthFER's own crops is refused on this aligned cache, then allowed when told
    eval_args = ["eval", "--dataset", "folder", "--cache", str(cache), "--checkpoint", str(tiny_checkpoint)]
    eval_args += ["--bootstrap", "0", "--no-tracking", "--out", str(tmp_path / "ev")]
    _one_line_error(runner.invoke(app, eval_args), "trained on the dataset's own crops", "arcface112")
    assert runner.invoke(app, eval_args + ["--allow-template-mismatch"]).exit_code == 0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "aligned to arcface112 (mtcnn landmarks)" in report and "1 image(s) of this split dropped" in report


def test_bad_inputs_are_one_line(tiny_checkpoint, mtcnn_wheel, tmp_path):
    base = ["predict", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "f.csv")]
    weights = ["--detector-weights", str(mtcnn_wheel)]
    # missing weights: where to get them and where to put them
    result = runner.invoke(
        app, base + ["--images", str(grace_hopper()), "--detector-weights", str(tmp_path / "no.whl")]
    )
    _one_line_error(result, "no.whl", "pip download facenet-pytorch")
    result = runner.invoke(
        app,
        base
        + ["--images", str(grace_hopper()), "--detector", "retinaface", "--detector-weights", str(tmp_path / "r.zip")],
    )
    _one_line_error(result, "r.zip", "retinaface_resnet50_2020-07-20")
    # an image without a face
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 200, np.uint8))
    _one_line_error(runner.invoke(app, base + weights + ["--images", str(blank)]), "no face found", "blank.png")
    # a corrupt image and an unreadable video
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    _one_line_error(runner.invoke(app, base + weights + ["--images", str(broken)]), "broken.jpg")
    video = tmp_path / "clip.mp4"
    video.write_bytes(np.random.default_rng(0).bytes(4096))
    _one_line_error(runner.invoke(app, base + weights + ["--video", str(video)]), "clip.mp4")
    _one_line_error(runner.invoke(app, base + weights + ["--video", str(tmp_path / "none.mp4")]), "none.mp4")
    # an unknown detector, a bad table name, and a template the model was not trained on
    _one_line_error(runner.invoke(app, base + ["--images", str(blank), "--detector", "mtcn"]), "mtcnn")
    result = runner.invoke(app, [*base[:-1], str(tmp_path / "f.txt"), "--images", str(blank)])
    _one_line_error(result, "f.txt", ".csv or .parquet")
    result = runner.invoke(app, base + weights + ["--images", str(grace_hopper()), "--align", "arcface112"])
    _one_line_error(result, "--align arcface112", "--allow-template-mismatch")
    assert not (tmp_path / "f.csv").exists()


def test_overlays_never_replace_the_inputs(tiny_checkpoint, mtcnn_wheel, tmp_path):
    import hashlib
    import shutil

    photos = tmp_path / "photos"
    (photos / "b").mkdir(parents=True)
    shutil.copy(grace_hopper(), photos / "face.jpg")
    shutil.copy(grace_hopper(), photos / "b" / "face.jpg")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*.jpg")}
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--overlay", str(photos)]
    result = runner.invoke(app, args + ["--detector-weights", str(mtcnn_wheel), "--out", str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before  # the photos are untouched
    table = pd.read_csv(tmp_path / "t.csv")
    assert sorted(table["overlay"]) == ["face.overlay.jpg", "face_.overlay.jpg"]
    assert all((photos / name).is_file() for name in table["overlay"])
    # a rerun over the same folder does not read its own overlays as photos
    result = runner.invoke(app, args + ["--detector-weights", str(mtcnn_wheel), "--out", str(tmp_path / "t.csv")])
    assert result.exit_code == 0 and len(pd.read_csv(tmp_path / "t.csv")) == 2, result.output


def test_more_bad_inputs_are_one_line(tiny_checkpoint, mtcnn_wheel, tmp_path):
    import os
    import struct
    import zlib

    base = ["predict", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "f.csv")]
    weights = ["--detector-weights", str(mtcnn_wheel)]
    # a file name that is not UTF-8 (OpenCV would crash on it)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff.jpg")
    Path(odd).write_bytes(grace_hopper().read_bytes())
    _one_line_error(runner.invoke(app, base + weights + ["--images", odd]), "bad\\xff.jpg", "UTF-8")
    # a photo whose header claims 400 megapixels is refused before decoding
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    _one_line_error(runner.invoke(app, base + weights + ["--images", str(huge)]), "huge.png", "megapixels")
    # a text file as a checkpoint
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    result = runner.invoke(app, ["predict", "--checkpoint", str(text), "--images", str(huge)])
    _one_line_error(result, "notes.pt", "not a readable checkpoint")
    # options that only make sense for photos, given with --dataset; --root and --cache together
    result = runner.invoke(
        app, ["predict", "--checkpoint", str(tiny_checkpoint), "--dataset", "synthfer", "--root", str(tmp_path),
              "--out", str(tmp_path / "s.csv"), "--overlay", str(tmp_path / "o"), "--every", "2"]
    )  # fmt: skip
    _one_line_error(result, "--overlay", "--every", "only for --images or --video")
    result = runner.invoke(
        app, ["eval", "--dataset", "synthfer", "--root", str(tmp_path), "--cache", str(tmp_path), "--checkpoint",
              str(tiny_checkpoint)]
    )  # fmt: skip
    _one_line_error(result, "not both")
    result = runner.invoke(app, ["eval", "--dataset", "synthfer", "--checkpoint", str(tiny_checkpoint)])
    _one_line_error(result, "no data", "--root DIR", "--cache FOLDER")  # neither: not "not both"
    result = runner.invoke(app, base + ["--images", str(huge), "--tta", "flip", "--cache", str(tmp_path)])
    _one_line_error(result, "--tta, --cache", "only with --dataset")
    # a video without faces leaves no overlay behind
    blank_video = tmp_path / "blank.mp4"
    writer = cv2.VideoWriter(str(blank_video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    for _ in range(3):
        writer.write(np.full((120, 160, 3), 128, np.uint8))
    writer.release()
    result = runner.invoke(app, base + weights + ["--video", str(blank_video), "--overlay", str(tmp_path / "ov")])
    _one_line_error(result, "no face found", "blank.mp4")
    assert not list((tmp_path / "ov").glob("*")) if (tmp_path / "ov").exists() else True


def test_a_users_files_with_cache_names_are_not_replaced(tiny_synthfer, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.npy").write_bytes(b"my own array")
    args = ["data", "prepare", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--align", "arcface112"]
    result = runner.invoke(app, args + ["--landmarks", "dataset", "--out", str(mine)])
    _one_line_error(result, str(mine), "no cache.yaml written by fer_bench")
    assert (mine / "train.npy").read_bytes() == b"my own array"
    result = runner.invoke(app, args + ["--landmarks", "dataset", "--detector", "retinaface"])
    _one_line_error(result, "not used with --landmarks dataset")


def test_usage_errors_are_one_line_from_the_real_command(tmp_path):
    """Bad option values go through click's parser, outside the commands: ``main`` makes them one line too."""
    import subprocess
    import sys

    for args, fragment in (
        (["predict", "--checkpoint", "c.pt", "--images", "a", "--batch-size", "0"], "--batch-size"),
        (["predict", "--checkpoint", "c.pt", "--images", "a", "b"], "unexpected extra argument"),
        (["bogus"], "No such command"),
    ):
        out = subprocess.run([sys.executable, "-m", "fer_bench", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and fragment in out.stderr, out.stderr


def test_a_lazy_detector_is_known_by_its_weights_and_built_on_first_use(mtcnn_wheel):
    """An aligned cache that is already current never builds the detector (nor would a DDP rank reusing rank 0's)."""
    from fer_bench.faces import create_detector
    from fer_bench.faces.weights import sha256_file

    lazy = create_detector("mtcnn", weights=str(mtcnn_wheel), lazy=True)
    assert lazy.weights_sha256 == sha256_file(mtcnn_wheel) and lazy._built is None
    eager = create_detector("mtcnn", weights=str(mtcnn_wheel))
    photo = cv2.cvtColor(cv2.imread(str(grace_hopper())), cv2.COLOR_BGR2RGB)
    found, expected = lazy.detect([photo])[0], eager.detect([photo])[0]
    assert lazy._built is not None and len(found) == 1
    np.testing.assert_array_equal(found.boxes, expected.boxes)
    assert lazy.describe() == eager.describe()


@pytest.mark.parametrize("name", list_detectors())
def test_every_detector_is_offered_and_says_where_its_weights_go(name, tmp_path):
    """Each registered detector: a recipe may name it, the CLI's --detector help lists it, and missing weights are
    reported (eagerly, and lazily where only the weights are hashed) with the path that was tried."""
    recipe = tiny_recipe_dict(tmp_path / "data", tmp_path)
    recipe["data"]["align"] = {"template": "arcface112", "detector": name}
    assert recipe_from_dict(recipe).data.align.detector == name
    predict = dict((path, command) for path, command in COMMAND_TREE)[("predict",)]
    detector_help = next(p.help for p in predict.params if "--detector" in p.opts)
    assert name in detector_help
    assert name in WEIGHT_IDENTITIES.names()
    missing = tmp_path / "nowhere.pth"
    for lazy in (False, True):
        with pytest.raises(WeightsUnavailableError, match=re.escape(str(missing))):
            create_detector(name, weights=str(missing), lazy=lazy)


def test_a_recipe_with_an_unknown_detector_names_the_choices(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "data", tmp_path)
    recipe["data"]["align"] = {"template": "arcface112", "detector": "mtcn"}
    with pytest.raises(ConfigError, match=r"data.align.detector.*unknown face detector 'mtcn'; expected one of mtcnn"):
        recipe_from_dict(recipe)
