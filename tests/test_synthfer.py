"""SynthFER: determinism, ground-truth geometry, masks and label noise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer_bench.data import SynthFERConfig, generate_synthfer, get_dataset
from fer_bench.data.synthfer import ACTION_UNITS, render_sample
from fer_bench.errors import ConfigError, DataError


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path, tiny_synthfer):
    from tests.conftest import TINY_SYNTH

    again = generate_synthfer(out=tmp_path / "again", config=SynthFERConfig(**TINY_SYNTH), workers=2)
    assert _tree_digest(again) == _tree_digest(tiny_synthfer)
    other = generate_synthfer(out=tmp_path / "other", config=SynthFERConfig(**{**TINY_SYNTH, "seed": 4}), workers=1)
    assert _tree_digest(other)["manifest.parquet"] != _tree_digest(tiny_synthfer)["manifest.parquet"]


def test_layout_counts_and_manifest(tiny_synthfer):
    info = get_dataset("synthfer", tiny_synthfer)
    m = info.manifest
    assert (m["split"].value_counts().to_dict()) == {"train": 96, "val": 32, "test": 48}
    assert m["image_id"].is_unique
    assert all((tiny_synthfer / p).is_file() for p in m["path"])
    assert set(info.group_columns) == {"skin_tone", "hair", "age", "glasses"}
    assert {"occluded", "low_intensity"} <= set(info.subset_columns)
    assert len(m["landmarks"].iloc[0]) == 136 and len(m["au_intensity"].iloc[0]) == len(ACTION_UNITS)
    neutral = m[m["expression"] == "neutral"]
    assert (neutral["intensity"] == 0).all()


def test_refuses_to_overwrite_without_flag(tiny_synthfer):
    with pytest.raises(ConfigError, match="--overwrite"):
        generate_synthfer(out=tiny_synthfer, config=SynthFERConfig(size=32, n_train=1, n_val=0, n_test=0))


def test_missing_root_names_the_generator(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="ferbench data synth"):
        get_dataset("synthfer", tmp_path / "empty")


def test_landmarks_follow_ibug_order():
    cfg = SynthFERConfig(size=112, occlusion_fraction=0.0)
    for i in range(20):
        rgb, rec, _, _ = render_sample(cfg, "test", i)
        lm = np.asarray(rec["landmarks"]).reshape(68, 2)
        assert ((lm > -5) & (lm < 117)).all()
        # Image-left eye (36-41) is left of the image-right eye (42-47); brows above eyes; chin (8) below the mouth.
        up = lm[27] - lm[8]
        up /= np.linalg.norm(up)
        proj = lm @ up
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
        assert proj[17:27].mean() > proj[36:48].mean() > proj[48:68].mean() > proj[8]
        # The nose tip lies between the eyes and the mouth.
        assert proj[36:48].mean() > proj[30] > proj[48:60].mean()


def test_open_mouth_is_dark_inside():
    """Surprise at high intensity opens the jaw: the mouth cavity between 62 and 66 is drawn dark."""
    cfg = SynthFERConfig(size=112, occlusion_fraction=0.0, label_space="all8", min_intensity=0.9)
    found = 0
    for i in range(200):
        rgb, rec, _, _ = render_sample(cfg, "train", i)
        if rec["expression"] != "surprise":
            continue
        lm = np.asarray(rec["landmarks"]).reshape(68, 2)
        centre = np.round((lm[62] + lm[66]) / 2).astype(int)
        assert rgb[centre[1], centre[0]].mean() < 110, rgb[centre[1], centre[0]]
        found += 1
    assert found >= 5


def test_occlusion_mask_covers_the_occluder():
    cfg = SynthFERConfig(size=112, occlusion_fraction=1.0)
    kinds = set()
    for i in range(40):
        rgb, rec, occ, _ = render_sample(cfg, "val", i)
        assert rec["occluded"] and occ.dtype == np.uint8 and set(np.unique(occ)) <= {0, 1}
        assert occ.sum() > 0.01 * occ.size
        lm = np.asarray(rec["landmarks"]).reshape(68, 2)
        if rec["occluder"] == "sunglasses":
            for first in (36, 42):
                c = np.round(lm[first : first + 6].mean(0)).astype(int)
                assert occ[c[1], c[0]] == 1
        kinds.add(rec["occluder"])
    clean = SynthFERConfig(size=112, occlusion_fraction=0.0)
    _, rec, occ, _ = render_sample(clean, "val", 0)
    assert not rec["occluded"] and occ.sum() == 0
    assert len(kinds) >= 3


def test_au_regions_contain_their_landmarks_and_contempt_is_one_sided():
    cfg = SynthFERConfig(size=112, occlusion_fraction=0.0)
    k12 = ACTION_UNITS.index(12)
    k1 = ACTION_UNITS.index(1)
    seen_contempt = False
    for i in range(60):
        _, rec, _, regions = render_sample(cfg, "train", i)
        lm = np.asarray(rec["landmarks"]).reshape(68, 2) / 4  # region grid is size // 4
        g = regions.shape[-1]
        for au_index, points in ((k1, (21, 22)), (k12, (48, 54) if rec["expression"] != "contempt" else ())):
            for p in points:
                x, y = np.clip(np.round(lm[p]).astype(int), 0, g - 1)
                assert regions[au_index, y, x] == 1
        if rec["expression"] == "contempt":
            seen_contempt = True
            # Unilateral AU12: the region holds exactly one mouth corner.
            inside = [regions[k12][tuple(np.clip(np.round(lm[p][::-1]).astype(int), 0, g - 1))] for p in (48, 54)]
            assert sorted(inside) == [0, 1]
    assert seen_contempt


def test_masks_file_roundtrip(tiny_synthfer):
    info = get_dataset("synthfer", tiny_synthfer)
    masks = info.extras["masks"]()
    assert masks["occlusion"].shape == (len(info.manifest), 32, 32)
    assert masks["au_regions"].shape == (len(info.manifest), len(ACTION_UNITS), 8, 8)
    occluded = info.manifest["occluded"].to_numpy()
    assert (masks["occlusion"].reshape(len(occluded), -1).sum(1) > 0).tolist() == occluded.tolist()


@pytest.mark.parametrize("noise_type", ["symmetric", "class_dependent"])
def test_label_noise_fraction_and_clean_labels(tmp_path, noise_type):
    cfg = SynthFERConfig(size=32, n_train=200, n_val=20, n_test=20, label_noise=0.3, noise_type=noise_type, seed=1)
    root = generate_synthfer(out=tmp_path / "noisy", config=cfg, workers=1)
    m = pd.read_parquet(root / "manifest.parquet")
    train = m[m["split"] == "train"]
    assert (train["label"] != train["clean_label"]).sum() == 60
    rest = m[m["split"] != "train"]
    assert (rest["label"] == rest["clean_label"]).all()
    names = list(m.drop_duplicates("clean_label").sort_values("clean_label")["expression"])
    if noise_type == "class_dependent":
        flipped = train[train["label"] != train["clean_label"]]
        partners = {"surprise": "fear", "fear": "surprise", "anger": "disgust", "disgust": "anger"}
        for _, row in flipped.iterrows():
            if row["expression"] in partners:
                assert names[row["label"]] == partners[row["expression"]]


def test_bias_injection_ties_tone_to_label_in_train_only(tmp_path):
    cfg = SynthFERConfig(size=32, n_train=160, n_val=0, n_test=80, bias=1.0, seed=2)
    root = generate_synthfer(out=tmp_path / "biased", config=cfg, workers=1)
    m = pd.read_parquet(root / "manifest.parquet")
    tones = ["I", "II", "III", "IV", "V", "VI"]
    train = m[m["split"] == "train"]
    assert all(tones[label % 6] == tone for label, tone in zip(train["clean_label"], train["skin_tone"], strict=True))
    test = m[m["split"] == "test"]
    assert (
        sum(tones[label % 6] == tone for label, tone in zip(test["clean_label"], test["skin_tone"], strict=True)) < 40
    )


def test_bad_parameters_name_the_field():
    with pytest.raises(ConfigError, match="size"):
        SynthFERConfig(size=30)
    with pytest.raises(ConfigError, match="label_noise"):
        SynthFERConfig(label_noise=1.5)


def test_a_recipe_never_trains_on_a_synthfer_rendered_with_other_parameters(tiny_synthfer):
    """data.synth names what the run needs; a folder of that name holding another rendering is an error, not data."""
    from fer_bench.errors import ConfigError
    from fer_bench.train.data_setup import load_dataset
    from tests.conftest import TINY_SYNTH

    same = load_dataset(dataset="synthfer", root=tiny_synthfer, options={}, synth=dict(TINY_SYNTH), message=print)
    assert len(same.manifest) > 0
    with pytest.raises(ConfigError) as info:
        load_dataset(
            dataset="synthfer", root=tiny_synthfer, options={}, synth={**TINY_SYNTH, "label_noise": 0.3}, message=print
        )
    assert "label_noise 0.0 there, 0.3 asked" in str(info.value) and str(tiny_synthfer) in str(info.value)
