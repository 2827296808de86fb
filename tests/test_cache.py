"""The prepared cache: the same pixels as decoding, reuse and rebuild with a reason, atomic and locked builds, crops
and landmarks in cache pixels, and every consumer reading it like the dataset it came from."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fer_bench.data import FaceDataset, create_transform, decode_image, get_dataset
from fer_bench.data.cache import (
    CACHE_FORMAT_VERSION,
    auto_cache_dir,
    cached_dataset,
    open_cache,
    prepare_cache,
)
from fer_bench.data.dataset import crop_box
from fer_bench.errors import DataError
from fer_bench.eval import evaluate
from fer_bench.models import create_model
from tests import formats

REPO = Path(__file__).resolve().parents[1]


def _messages():
    out: list[str] = []
    return out, out.append


def test_synthfer_cache_is_rendered_from_the_generator_and_equals_the_pngs(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    said, say = _messages()
    cached = cached_dataset(info, cache=str(tmp_path / "c"), size=32, message=say)
    assert "building" in said[0] and "no cache there yet" in said[0]
    card = yaml.safe_load((tmp_path / "c" / "cache.yaml").read_text())
    assert card["format_version"] == CACHE_FORMAT_VERSION and card["dataset"] == "synthfer"
    assert card["counts"] == {"train": 96, "val": 32, "test": 48} and card["parameters"]["size"] == 32
    assert card["pixels"] == "rendered by the SynthFER generator" and len(card["source_hash"]) == 64
    from fer_bench.data import dataset_hash

    manifest = info.manifest
    assert card["dataset_hash"] == dataset_hash(manifest["image_id"].astype(str), manifest["label"])
    train = np.load(tmp_path / "c" / "train.npy", mmap_mode="r")
    assert train.shape == (96, 32, 32, 3) and train.dtype == np.uint8
    rows = cached.split("test")
    images = cached.extra("images")
    for k in (0, 7, 47):  # byte-identical to the PNG the generator wrote (PNG is lossless)
        png = decode_image(tiny_synthfer / info.split("test").at[k, "path"])
        assert np.array_equal(images[int(rows.at[k, "array_index"])], png)
    # groups, subsets, labels and the dataset hash survive; landmarks stay in (identical) pixels
    original = info.split("test")
    assert rows["image_id"].tolist() == original["image_id"].tolist()
    assert rows["skin_tone"].tolist() == original["skin_tone"].tolist()
    assert rows["occluded"].tolist() == original["occluded"].tolist()
    np.testing.assert_allclose(rows.at[3, "landmarks"], np.asarray(original.at[3, "landmarks"]), atol=1e-3)
    masks = cached.extra("masks")
    assert masks["occlusion"].shape == (176, 32, 32)
    occluded = int(np.nonzero(rows["occluded"].to_numpy())[0][0])
    assert masks["occlusion"][int(rows.at[occluded, "mask_index"])].any()


def test_reused_while_unchanged_rebuilt_with_a_reason_otherwise(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=2)
    info = get_dataset("rafdb", root)
    folder = tmp_path / "cache"
    said, say = _messages()
    prepare_cache(info, out=folder, size=24, message=say)
    built = (folder / "train.npy").stat().st_mtime_ns
    prepare_cache(get_dataset("rafdb", root), out=folder, size=24, message=say)
    assert "reused" in said[-1] and (folder / "train.npy").stat().st_mtime_ns == built
    prepare_cache(get_dataset("rafdb", root), out=folder, size=32, message=say)
    assert "rebuilding (size changed: 24 -> 32)" in said[-2]
    image = sorted((root / "basic" / "Image" / "aligned").glob("train_*"))[0]
    formats.write_image(image, seed=999)  # the same file name, new content
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    prepare_cache(get_dataset("rafdb", root), out=folder, size=32, message=say)
    assert "rebuilding (the source changed" in said[-2]
    (folder / "cache.yaml").write_text("{not: [valid")
    prepare_cache(get_dataset("rafdb", root), out=folder, size=32, message=say)
    assert "cache.yaml: unreadable" in said[-2]


def test_truncated_array_is_named_by_open_and_rebuilt_by_prepare(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=2)
    folder = tmp_path / "cache"
    prepare_cache(get_dataset("rafdb", root), out=folder, size=24, message=lambda m: None)
    data = (folder / "train.npy").read_bytes()
    (folder / "train.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train.npy"):
        open_cache(folder)
    said, say = _messages()
    prepare_cache(get_dataset("rafdb", root), out=folder, size=24, message=say)
    assert "train.npy is unreadable" in said[0]
    assert open_cache(folder).extra("images").take(np.arange(3)).shape == (3, 24, 24, 3)


def test_affectnet_box_crop_and_landmarks_in_cache_pixels(tmp_path):
    root = formats.write_affectnet_csv(tmp_path / "aff", per_code=1)
    info = get_dataset("affectnet", root, classes=8)
    assert info.crop_to_bbox
    cached = cached_dataset(info, cache=str(tmp_path / "c"), size=20, message=lambda m: None)
    row, source = cached.split("train").iloc[0], info.split("train").iloc[0]
    import cv2

    expected = cv2.resize(
        crop_box(decode_image(root / source["path"]), source["bbox"]), (20, 20), interpolation=cv2.INTER_AREA
    )
    assert np.array_equal(cached.extra("images")[int(row["array_index"])], expected)
    from fer_bench.data.manifest import landmarks_array

    points = landmarks_array(source["landmarks"])  # AffectNet's "x;y;..." text, in the full 64 px image
    moved = (points - [8, 8] + 0.5) * (20 / 48) - 0.5  # the box is (8, 8, 48, 48)
    np.testing.assert_allclose(np.asarray(row["landmarks"]).reshape(-1, 2), moved, atol=2e-3)
    assert not cached.crop_to_bbox and "bbox" not in cached.manifest.columns


def test_evaluation_through_the_cache_matches_decoding(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    cached = cached_dataset(info, cache=str(tmp_path / "c"), size=32, message=lambda m: None)
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_patch16_224", num_classes=8, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    )
    names = tuple(info.label_space.names)
    a = evaluate(model, info, split="test", img_size=32, label_names=names, n_bootstrap=0)
    b = evaluate(model, cached, split="test", img_size=32, label_names=names, n_bootstrap=0)
    assert a["metrics"]["acc"] == b["metrics"]["acc"] and a["dataset_hash"] == b["dataset_hash"]
    assert a["metrics"]["nll"] == pytest.approx(b["metrics"]["nll"], rel=1e-6)
    # and the per-sample inputs are the same tensors
    transform = create_transform(train=False, img_size=32)
    x = FaceDataset.from_info(info, "test", transform=transform)[5]["image"]
    y = FaceDataset.from_info(cached, "test", transform=transform)[5]["image"]
    assert torch.equal(x, y)


def _cache_cli(dataset: str, root: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fer_bench", "data", "cache", "--dataset", dataset, "--root", str(root)]
    return subprocess.Popen(
        [*cmd, "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def test_two_processes_build_one_cache(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=4)
    out = tmp_path / "cache"
    procs = [_cache_cli("rafdb", root, out, "--size", "24") for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    text = "\n".join(outputs)
    assert text.count("built in") == 1 and text.count("reused") == 1, text
    assert open_cache(out).extra("images").counts == {"train": 28, "test": 7}


def test_a_killed_build_leaves_the_old_cache_and_the_next_build_cleans_up(tmp_path, tiny_synthfer):
    from fer_bench.data import SynthFERConfig, generate_synthfer

    root = tmp_path / "synth"
    generate_synthfer(out=root, config=SynthFERConfig(seed=1, size=64, n_train=1500, n_val=0, n_test=0), workers=2)
    out = tmp_path / "cache"
    prepare_cache(get_dataset("synthfer", root), out=out, size=16, message=lambda m: None)
    before = (out / "train.npy").read_bytes()
    proc = _cache_cli("synthfer", root, out, "--size", "64", "--workers", "1")
    partial = tmp_path / ".cache.partial"
    deadline = time.time() + 120
    while not (partial / "train.npy").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # mid-build: rendering 1,500 faces on one worker takes seconds
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / "train.npy").read_bytes() == before  # the old cache is whole
    assert open_cache(out).extra("image_size") == 16
    assert partial.exists()  # the killed build's leftovers ...
    said, say = _messages()
    prepare_cache(get_dataset("synthfer", root), out=out, size=64, workers=2, message=say)
    assert not partial.exists() and open_cache(out).extra("image_size") == 64  # ... are cleared by the next build
    assert "rebuilding (size changed: 16 -> 64)" in said[0]


def test_training_from_a_cache_alone_and_the_cli_names_the_cache(tiny_synthfer, tmp_path):
    from typer.testing import CliRunner

    from fer_bench.cli import app
    from fer_bench.train import fit, recipe_from_dict
    from tests.conftest import Recorder, tiny_recipe_dict

    root = tmp_path / "synth"
    shutil.copytree(tiny_synthfer, root)
    folder = tmp_path / "prepared"
    result = CliRunner().invoke(
        app, ["data", "cache", "--dataset", "synthfer", "--root", str(root), "--out", str(folder), "--size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert f"cache {folder}: train 96, val 32, test 48" in result.output and "data.cache=" in result.output
    shutil.rmtree(root)  # only the cache travels to the training machine
    recipe = tiny_recipe_dict(root, tmp_path, **{"optim.epochs": 1})
    recipe["data"]["cache"] = str(folder)
    recorder = Recorder()
    said = recorder.messages

    out = fit(recipe_from_dict(recipe), callbacks=recorder)
    assert out.test_results["n"] == 48
    assert any("training from the prepared cache" in m for m in said)
    resolved = yaml.safe_load((out.output_dir / "recipe.resolved.yaml").read_text())["_resolved"]
    assert resolved["loader"] == "device" and resolved["cache"] == str(folder)


def test_auto_cache_folder_is_stable_and_keyed_on_root_options_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_BENCH_CACHE_DIR", str(tmp_path))
    a = auto_cache_dir("rafdb", tmp_path / "x", size=224, options={"images": "aligned"})
    assert a == auto_cache_dir("rafdb", tmp_path / "x", size=224, options={"images": "aligned"})
    assert a.parent == tmp_path and a.name.startswith("rafdb-224px-")
    assert a != auto_cache_dir("rafdb", tmp_path / "y", size=224, options={"images": "aligned"})
    assert a != auto_cache_dir("rafdb", tmp_path / "x", size=112, options={"images": "aligned"})


def test_a_folder_that_is_not_a_cache_is_never_replaced(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=2)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    from fer_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="holds files a fer_bench cache does not"):
        prepare_cache(get_dataset("rafdb", root), out=precious, size=24, message=lambda m: None)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ConfigError, match="holds files"):  # the dataset root itself, by mistake
        prepare_cache(get_dataset("rafdb", root), out=root, size=24, message=lambda m: None)
    assert (root / "basic" / "EmoLabel" / "list_patition_label.txt").is_file()
    # a folder whose cache.yaml is someone else's file (or a broken card) next to other files: still not replaced
    (precious / "cache.yaml").write_text("redis: {host: localhost}\n")
    with pytest.raises(ConfigError, match="thesis.tex"):
        prepare_cache(get_dataset("rafdb", root), out=precious, size=24, message=lambda m: None)
    assert (precious / "thesis.tex").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_cache(get_dataset("rafdb", root), out=tmp_path / "afile", size=24, message=lambda m: None)
    with pytest.raises(DataError, match="while preparing the cache"):  # a place that cannot be written
        prepare_cache(get_dataset("rafdb", root), out=tmp_path / "afile" / "sub", size=24, message=lambda m: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_cache(get_dataset("rafdb", root), out=empty, size=24, message=lambda m: None)  # an empty folder is fine
    assert (empty / "cache.yaml").is_file()


def test_a_changed_group_annotation_rebuilds_the_cache(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=2)
    info = get_dataset("rafdb", root)
    folder = tmp_path / "cache"
    prepare_cache(info, out=folder, size=24, message=lambda m: None)
    column = info.group_columns[0]
    info.manifest.loc[0, column] = "corrected"
    said, say = _messages()
    prepare_cache(info, out=folder, size=24, message=say)
    assert "the source changed" in said[0]
    assert open_cache(folder).manifest[column].tolist().count("corrected") == 1


def test_a_card_of_the_wrong_shape_is_rebuilt_not_a_traceback(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=2)
    folder = tmp_path / "cache"
    prepare_cache(get_dataset("rafdb", root), out=folder, size=24, message=lambda m: None)
    for text in ("dataset: rafdb\nparameters: 5\ncounts: 3\n", "parameters: {size: 24}\ncounts: {train: abc}\n", ""):
        (folder / "cache.yaml").write_text(text)
        with pytest.raises(DataError, match="cache.yaml"):
            open_cache(folder)
        said, say = _messages()
        prepare_cache(get_dataset("rafdb", root), out=folder, size=24, message=say)
        assert "rebuilding" in said[0] and "cache.yaml" in said[0]
