"""Bad input found by probing the CLI (issue 12, "Reliability findings"): each is one line and exit code 2."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from tests.conftest import tiny_recipe_dict
from tests.test_cli import _one_line_error

runner = CliRunner()


def test_a_zero_byte_image_is_named_by_verify(tiny_synthfer, tmp_path):
    import shutil

    root = tmp_path / "sf"
    shutil.copytree(tiny_synthfer, root)
    victim = sorted((root / "images").rglob("*.png"))[0]
    victim.write_bytes(b"")
    result = runner.invoke(app, ["data", "verify", "--dataset", "synthfer", "--root", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{victim.name}: empty file (0 bytes)" in result.output and "1 of" in result.output


def test_recipes_that_are_not_utf8_or_empty(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: t\n\xff\xfe: 1\n")
    _one_line_error(runner.invoke(app, ["train", str(binary)]), "binary.yaml:2", "not UTF-8")
    for text in ("", "\n\n", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        _one_line_error(runner.invoke(app, ["train", str(empty)]), "empty.yaml", "the recipe is empty")


def test_an_image_size_the_conv_stem_cannot_tile(tiny_synthfer, tmp_path):
    recipe = tmp_path / "r.yaml"
    data = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"data.img_size": 36})
    data["model"]["stem"] = "conv"
    recipe.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["train", str(recipe), "--set", "tracking.enabled=false"])
    _one_line_error(result, "img_size=36", "multiple of 8", "32 or 40")


def test_main_lets_a_bug_keep_its_traceback(monkeypatch):
    """Only user errors become one line: anything else propagates unchanged (not turned into another error)."""
    import fer_bench.cli as cli

    def broken(**_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()


def test_checkpoints_that_do_not_fit_their_model_config(tiny_synthfer, tmp_path):
    import torch

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    assert runner.invoke(app, ["train", str(recipe), "--set", "tracking.enabled=false"]).exit_code == 0
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    base = ["eval", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--no-tracking", "--bootstrap", "0"]
    cases = {
        "classes.pt": (("model_config", "num_classes", 5), "do not fit its model_config", "size mismatch"),
        "size.pt": (("model_config", "img_size", "abc"), "model_config is malformed", "'abc'"),
        "backbone.pt": (("model_config", "backbone", "no_such_net"), "does not build a model", "no_such_net"),
    }
    for name, ((section, key, value), *fragments) in cases.items():
        broken = {**state, section: {**state[section], key: value}}
        torch.save(broken, tmp_path / name)
        _one_line_error(runner.invoke(app, [*base, "--checkpoint", str(tmp_path / name)]), *fragments)
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    result = runner.invoke(app, [*base, "--checkpoint", str(tmp_path / "noise.pt")])
    _one_line_error(result, "noise.pt", "not a torch.save file")


def test_options_a_submission_cannot_use(tmp_path):
    sub = tmp_path / "sub.csv"
    sub.write_text("image_id,prediction\n")
    base = ["eval", "--dataset", "synthfer", "--root", str(tmp_path), "--predictions", str(sub)]
    _one_line_error(runner.invoke(app, [*base, "--tta", "flip", "--batch-size", "8"]), "--tta, --batch-size")
    _one_line_error(runner.invoke(app, [*base, "--perturb", "blur"]), "--perturb", "only with --checkpoint")


def test_a_mistyped_backbone_suggests_the_nearest_names():
    from fer_bench.errors import ConfigError
    from fer_bench.models.backbone import create_backbone

    with pytest.raises(ConfigError, match="Did you mean 'swin_tiny_patch4_window7_224'"):
        create_backbone("swin_tiny_patch4_windw7_224", num_classes=3, img_size=32)


def test_truth_au_maps_follow_the_rendered_expression_not_a_noisy_label(tiny_synthfer):
    """SynthFER's true AU map shows the face as rendered (clean_label): a training label flipped to neutral by label
    noise must not blank it."""
    import numpy as np

    from fer_bench.data import FaceDataset, create_transform, get_dataset

    info = get_dataset("synthfer", tiny_synthfer)
    names = info.label_space.names
    rows = info.split("test")
    row = rows[rows["clean_label"] == names.index("happiness")].head(1).copy()
    row["label"] = names.index("neutral")  # what label noise would do
    dataset = FaceDataset.from_info(
        info, "test", rows=row.reset_index(drop=True), transform=create_transform(train=False, img_size=32),
        heatmaps="truth",
    )  # fmt: skip
    truth = dataset._truth_map(0, (32, 32))
    assert truth.max() > 0.5 and np.isfinite(truth).all()


def test_verify_says_what_it_converts_and_flags_tiny_images(tmp_path):
    import cv2
    import numpy as np

    from tests.formats import write_class_folders

    root = write_class_folders(tmp_path / "folder")
    happy = root / "train" / "happy"
    cv2.imwrite(str(happy / "grey.png"), np.full((40, 40), 128, np.uint8))
    cv2.imwrite(str(happy / "deep.png"), np.full((40, 40, 3), 40000, np.uint16))
    cv2.imwrite(str(happy / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    result = runner.invoke(app, ["data", "verify", "--dataset", "folder", "--root", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "1 image(s) grey, read as RGB" in result.output and "1 image(s) 16-bit, scaled to 8-bit" in result.output
    assert "dot.png: 1x1 px, below the 16-px minimum" in result.output


def test_git_sha_is_fer_benchs_own_commit_from_any_folder(tmp_path):
    """Recorded in every result: the commit of the fer_bench code that ran, not of the caller's working folder."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    code = "from fer_bench.provenance import git_sha; print(git_sha())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True, timeout=60
    ).stdout.strip()
    if head:  # a git checkout (CI's clone is one)
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        assert out == head + ("-dirty" if dirty else "")
    else:
        assert out == "unknown"


def test_atomic_writes_keep_normal_permissions(tmp_path):
    import os

    from fer_bench._io import atomic_write_text

    target = tmp_path / "report.md"
    atomic_write_text(target, "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "hello" and (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left


def test_atomic_writes_get_open_s_permissions_under_umask_022(tmp_path):
    import os

    from fer_bench._io import atomic_write_text

    previous = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.csv"
        atomic_write_text(fresh, "a")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.csv"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write_text(kept, "new")  # replacing a file keeps its mode, as open(path, "w") would
        assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
