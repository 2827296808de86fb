"""Aligned caches (``ferbench data prepare``): alignment from the dataset's landmarks, the record in cache.yaml,
reuse and rebuild, training and evaluating on an aligned cache, and the template-mismatch refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_bench.data import get_dataset
from fer_bench.data.cache import open_cache
from fer_bench.data.manifest import landmarks_array
from fer_bench.data.prepare import choose_face, face_framing, prepare_aligned
from fer_bench.errors import ConfigError, DataError
from fer_bench.faces import Faces, alignment_matrices, five_from_68, get_template, transform_points


def _messages():
    seen: list[str] = []
    return seen, seen.append


def test_aligned_cache_from_dataset_landmarks(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    seen, message = _messages()
    folder = prepare_aligned(
        info, template="arcface112", size=48, landmarks="dataset", out=tmp_path / "aligned", message=message
    )
    card = yaml.safe_load((folder / "cache.yaml").read_text())
    record = card["alignment"]
    assert record["template"] == "arcface112" and record["landmarks"] == "dataset" and record["size"] == 48
    assert record["outcomes"] == {"dataset landmarks": len(info.manifest)}
    assert card["parameters"]["alignment"]["template"] == "arcface112"
    cached = open_cache(folder)
    assert "aligned to arcface112" in cached.layout
    assert cached.extras["alignment"]["template"] == "arcface112"
    # the cached landmarks are the source landmarks moved by each row's alignment matrix
    source = info.manifest.set_index("image_id")
    template = get_template("arcface112").at(48)
    residuals = []
    for _, row in cached.manifest.head(10).iterrows():
        points = landmarks_array(source.at[row["image_id"], "landmarks"])
        matrix = alignment_matrices(five_from_68(points)[None], template="arcface112", size=48)
        expected = transform_points(points[None], matrix)[0]
        np.testing.assert_allclose(row["landmarks"].reshape(-1, 2), expected, atol=2e-3)
        np.testing.assert_allclose(row["face_landmarks"].reshape(5, 2), five_from_68(expected), atol=2e-3)
        residuals.append(np.abs(row["face_landmarks"].reshape(5, 2) - template).mean())
    assert np.mean(residuals) < 1.5  # on the template, up to each identity's face shape
    # the pixels are the warp of the source image (cv2 on the CPU path)
    images = cached.extra("images")
    first = cached.manifest.iloc[0]
    from fer_bench.data.synthfer import render_image

    original = render_image(info.extras["synth_config"], first["image_id"])
    points = five_from_68(landmarks_array(source.at[first["image_id"], "landmarks"]))
    from fer_bench.faces import warp_image

    matrix = alignment_matrices(points[None], template="arcface112", size=48)[0].numpy()
    np.testing.assert_array_equal(images[int(first["array_index"])], warp_image(original, matrix, 48))
    # the model's framing is the template
    framing = face_framing(cached)
    assert framing["alignment"] == "arcface112" and framing["size"] == 48
    np.testing.assert_allclose(np.asarray(framing["points"]), template, atol=1e-3)


def test_aligned_cache_is_reused_and_rebuilt_when_the_alignment_changes(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    seen, message = _messages()
    out = tmp_path / "aligned"
    prepare_aligned(info, template="arcface112", size=32, landmarks="dataset", out=out, message=message)
    prepare_aligned(info, template="arcface112", size=32, landmarks="dataset", out=out, message=message)
    assert "reused" in seen[-1]
    prepare_aligned(info, template="ffhq512", size=32, landmarks="dataset", out=out, message=message)
    assert any("rebuilding" in m and "alignment changed" in m for m in seen)
    assert open_cache(out).extras["alignment"]["template"] == "ffhq512"
    # auto folders: one per alignment
    a = prepare_aligned(info, template="arcface112", size=32, landmarks="dataset", message=message)
    b = prepare_aligned(info, template="rafdb_like", size=32, landmarks="dataset", message=message)
    assert a != b and "arcface112" in a.name and "rafdb_like" in b.name


def test_a_plain_cache_never_overwrites_an_aligned_one(tiny_synthfer, tmp_path):
    from fer_bench.data.cache import cached_dataset

    info = get_dataset("synthfer", tiny_synthfer)
    out = tmp_path / "aligned"
    prepare_aligned(info, template="arcface112", size=32, landmarks="dataset", out=out, message=lambda _: None)
    with pytest.raises(ConfigError, match="aligned to arcface112"):
        cached_dataset(info, cache=str(out), size=32, message=lambda _: None)
    assert open_cache(out).extras["alignment"]["template"] == "arcface112"


def test_dataset_landmarks_missing_is_one_clear_error(tmp_path):
    from tests.formats import write_class_folders

    root = write_class_folders(tmp_path / "folder")
    info = get_dataset("folder", root)
    with pytest.raises(DataError, match="ships no landmarks"):
        prepare_aligned(info, template="arcface112", landmarks="dataset", out=tmp_path / "c", message=lambda _: None)
    with pytest.raises(ConfigError, match="needs a detector"):
        prepare_aligned(info, template="arcface112", landmarks="detector", out=tmp_path / "c", message=lambda _: None)


def _faces(boxes, scores):
    boxes = np.asarray(boxes, np.float32)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    return Faces(boxes, scores, np.repeat(centres[:, None], 5, axis=1))


def test_choose_face_by_reason():
    none = _faces(np.zeros((0, 4)), [])
    one = _faces([[0, 0, 10, 10]], [0.9])
    two = _faces([[0, 0, 10, 10], [50, 50, 80, 80]], [0.99, 0.8])
    assert choose_face(none, select="largest") == (None, "dropped: no face")
    assert choose_face(one, select="drop") == (0, "one face")
    assert choose_face(two, select="largest") == (1, "several faces: kept the largest")
    assert choose_face(two, select="confident") == (0, "several faces: kept the most confident")
    assert choose_face(two, select="drop") == (None, "dropped: several faces")
    # the dataset's own face box picks the face it overlaps, whatever the policy
    assert choose_face(two, select="drop", dataset_box=[1, 1, 11, 11])[0] == 0


def test_rafdb_manual_landmarks_align_the_original_images(tmp_path):
    """RAF-DB's five manual points locate faces in Image/original: ``--landmarks dataset`` aligns with them, and the
    image without an annotation file is dropped and counted, not mis-cropped."""
    import shutil

    from tests.formats import write_image, write_rafdb_official

    root = write_rafdb_official(tmp_path / "raf")
    base = root / "basic"
    for aligned in sorted((base / "Image" / "aligned").glob("*.jpg")):
        original = base / "Image" / "original" / aligned.name.replace("_aligned", "")
        write_image(original, seed=len(aligned.name), size=100)
    aligned_only = get_dataset("rafdb", root)
    with pytest.raises(DataError, match="--option images=original"):
        prepare_aligned(aligned_only, template="arcface112", landmarks="dataset", out=tmp_path / "c0", message=print)
    info = get_dataset("rafdb", root, images="original")
    folder = prepare_aligned(
        info, template="arcface112", size=56, landmarks="dataset", out=tmp_path / "c", message=print
    )
    record = open_cache(folder).extras["alignment"]
    assert record["outcomes"] == {"dataset landmarks": len(info.manifest) - 1, "dropped: no landmarks": 1}
    assert "train_00003" not in set(open_cache(folder).manifest["image_id"])
    rows = open_cache(folder).manifest
    # five manual points: the 68 are fitted (region priors), the five land near the template
    assert "fitted to the 5 points" in record["landmarks68"]
    five = np.stack([v.reshape(5, 2) for v in rows["face_landmarks"]])
    assert np.abs(five - get_template("arcface112").at(56)).mean() < 3
    shutil.rmtree(folder)


def test_prepare_then_train_and_eval_on_the_aligned_cache(tiny_synthfer, tmp_path):
    """The CLI round trip: ``data prepare`` → ``train --set data.cache=DIR`` (alignment adopted and recorded) →
    ``eval --cache DIR``; the dataset's own crops are refused for that model unless allowed."""
    import torch
    from typer.testing import CliRunner

    from fer_bench.cli import app
    from tests.conftest import tiny_recipe_dict
    from tests.test_cli import _one_line_error

    runner = CliRunner()
    cache = tmp_path / "aligned"
    args = ["data", "prepare", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--align", "arcface112"]
    result = runner.invoke(app, args + ["--landmarks", "dataset", "--size", "32", "--out", str(cache)])
    assert result.exit_code == 0, result.output
    assert "aligned to arcface112 (the dataset's landmarks)" in result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    result = runner.invoke(
        app, ["train", str(recipe), "--set", f"data.cache={cache}", "--set", "tracking.enabled=false"]
    )
    assert result.exit_code == 0, result.output
    assert "aligned to arcface112" in result.output
    run = tmp_path / "run"
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["face_framing"]["alignment"] == "arcface112"
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["_resolved"]
    assert resolved["face_framing"]["template"] == "arcface112" and "aligned to arcface112" in resolved["layout"]
    eval_args = ["eval", "--dataset", "synthfer", "--checkpoint", str(run / "best.pt"), "--bootstrap", "0"]
    eval_args += ["--no-tracking", "--out", str(tmp_path / "ev")]
    result = runner.invoke(app, eval_args + ["--cache", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    _one_line_error(
        runner.invoke(app, eval_args + ["--root", str(tiny_synthfer)]), "aligned to arcface112", "own crops"
    )
    _one_line_error(runner.invoke(app, eval_args + ["--cache", str(cache), "-o", "bogus=1"]), "bogus")
    # a recipe asking for another template than the cache holds is one line
    overrides = ["--set", f"data.cache={cache}", "--set", "data.align.template=ffhq512"]
    result = runner.invoke(app, ["train", str(recipe), *overrides, "--set", f"output_dir={tmp_path / 'run2'}"])
    _one_line_error(result, "data.align.template 'ffhq512'", "arcface112")


def test_recipe_data_align_builds_the_aligned_cache(tiny_synthfer, tmp_path):
    from fer_bench.train import fit, load_recipe
    from tests.conftest import Recorder, tiny_recipe_dict

    recipe = tmp_path / "r.yaml"
    data = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})
    data["data"]["align"] = {"template": "rafdb_like", "landmarks": "dataset"}
    data["tracking"]["enabled"] = False
    recipe.write_text(yaml.safe_dump(data))
    callbacks = Recorder()
    result = fit(load_recipe(recipe), callbacks=callbacks)
    assert any("rafdb_like" in m for m in callbacks.messages)  # the aligned cache built (or reused)
    import torch

    framing = torch.load(result.output_dir / "best.pt", weights_only=True)["face_framing"]
    assert framing["alignment"] == "rafdb_like" and framing["size"] == 32
    with pytest.raises(ConfigError, match="data.align.template"):
        load_recipe(recipe, ["data.align.template=arcface"])


def test_a_file_name_that_is_not_utf8_is_one_clear_error(tmp_path):
    import os

    from tests.formats import write_class_folders

    root = write_class_folders(tmp_path / "folder")
    odd = os.fsdecode(os.fsencode(str(root / "train" / "happy")) + b"/odd\xff.png")
    Path(odd).write_bytes((next((root / "train" / "happy").glob("*.png"))).read_bytes())
    with pytest.raises(DataError, match=r"odd\\xff.png: the file name is not valid UTF-8"):
        get_dataset("folder", root)
