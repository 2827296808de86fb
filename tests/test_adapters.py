"""Every adapter on fixtures written in the owners' real formats: layouts, label maps, counts, drops, groups."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from fer_bench.data import (
    FaceDataset,
    create_transform,
    describe_dataset,
    get_dataset,
    list_datasets,
    verify_images,
)
from fer_bench.data.adapters.affectnet import AFFECTNET_CODES
from fer_bench.data.adapters.fer2013 import FER2013_CODES
from fer_bench.data.adapters.ferplus import ferplus_target
from fer_bench.data.adapters.rafdb import RAFDB_CODES
from fer_bench.data.manifest import landmarks_array
from fer_bench.errors import ConfigError, DataError
from tests import formats

DESCRIBE_KEYS = {"dataset", "layout", "label_space", "splits", "groups", "subsets", "dropped"}


def _expressions(info, split=None):
    rows = info.manifest if split is None else info.split(split)
    return [info.label_space.names[i] for i in rows["label"]]


def _native_to_expression(info) -> dict[str, str]:
    pairs = zip(info.manifest["native_label"], _expressions(info), strict=True)
    return dict(sorted(set(pairs)))


# ---------------------------------------------------------------------------------------------------------------------
# RAF-DB


def test_rafdb_official_layout(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf")
    info = get_dataset("rafdb", root)
    assert info.layout.startswith("official basic")
    assert _native_to_expression(info) == {str(k): v for k, v in RAFDB_CODES.items()}
    summary = describe_dataset(info)
    assert set(summary) == DESCRIBE_KEYS
    assert summary["splits"]["train"]["total"] == 14 and summary["splits"]["test"]["total"] == 7
    assert all(n == 2 for n in summary["splits"]["train"]["per_label"].values())
    # groups from the manual files (tabs and spaces); train_00003 has none and is "unknown", counted
    assert summary["groups"]["gender"]["unknown"] == 1
    assert sum(summary["groups"]["gender"].values()) == 21
    assert set(summary["groups"]["race"]) == {"caucasian", "african_american", "asian", "unknown"}
    assert set(summary["groups"]["age"]) <= {"0-3", "4-19", "20-39", "40-69", "70+", "unknown"}
    assert any("1 images have no Annotation/manual" in n for n in info.notes)
    row = info.manifest.set_index("image_id").loc["test_0001"]
    assert row["path"] == "basic/Image/aligned/test_0001_aligned.jpg"
    assert np.allclose(row["landmarks_original"][:4], [30.5, 40.25, 60.0, 41.0])
    assert len(row["auto_landmarks_original"]) == 74 and row["bbox_original"][0] == pytest.approx(260.237671)
    # RAN subsets on test rows only
    assert summary["subsets"] == {"occlusion": 2, "pose30": 3, "pose45": 1}
    assert info.manifest.set_index("image_id").loc["test_0001", "occlusion_code"] == 3
    assert verify_images(info)["problems"] == []


def test_rafdb_original_images_carry_landmarks_and_box(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf")
    with pytest.raises(DataError, match=r"Image/original: folder not found"):
        get_dataset("rafdb", root, images="original")
    (root / "basic" / "Image" / "aligned").rename(root / "basic" / "Image" / "original")
    with pytest.raises(DataError, match="images=original"):
        get_dataset("rafdb", root)
    info = get_dataset("rafdb", root, images="original")
    assert info.manifest.set_index("image_id").loc["test_0001", "path"] == "basic/Image/original/test_0001.jpg"


@pytest.mark.parametrize("names", [False, True])
def test_rafdb_community_layouts(tmp_path, names):
    root = formats.write_rafdb_community(tmp_path / "raf", names=names)
    info = get_dataset("rafdb", root)
    assert ("numbered" in info.layout) != names
    summary = describe_dataset(info)
    assert summary["splits"]["train"]["total"] == 14 and summary["splits"]["test"]["total"] == 14
    assert all(v == 2 for v in summary["splits"]["test"]["per_label"].values())
    if not names:  # folder 1 = surprise ... 7 = neutral, never sort order
        assert _native_to_expression(info) == {str(k): v for k, v in RAFDB_CODES.items()}
    assert info.manifest["image_id"].str.match(r"^(train|test)_\d{4}$").all()


def test_rafdb_compound_is_its_own_taxonomy(tmp_path):
    root = formats.write_rafdb_compound(tmp_path / "rafc")
    info = get_dataset("rafdb-compound", root)
    assert info.label_space.num_classes == 11 and not info.label_space.canonical
    assert _expressions(info, "test") == ["disgustedly_surprised", "happily_surprised"]
    with pytest.raises(DataError, match=r"list_patition_label.txt:8: label '8' is not a RAF-DB basic code.*compound"):
        get_dataset("rafdb", root / "compound")


def test_rafdb_bad_input_names_file_and_line(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf")
    label_file = root / "basic" / "EmoLabel" / "list_patition_label.txt"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join([lines[0], "train_00002.jpg", *lines[2:]]))
    with pytest.raises(DataError, match=r"list_patition_label.txt:2: expected '<name>.jpg <label>'"):
        get_dataset("rafdb", root)
    label_file.write_text("\n".join([lines[0], "val_00002.jpg 3", *lines[2:]]))
    with pytest.raises(DataError, match=r":2: image name 'val_00002.jpg' does not start with train_ or test_"):
        get_dataset("rafdb", root)
    label_file.write_text("\n".join(lines))
    manual = root / "basic" / "Annotation" / "manual" / "train_00001_manu_attri.txt"
    manual.write_text(manual.read_text().replace("\n0\n0\n0\n", "\nx\n0\n0\n"))
    with pytest.raises(DataError, match=r"train_00001_manu_attri.txt:6: gender code must be one of \[0, 1, 2\]"):
        get_dataset("rafdb", root)
    manual.write_text("1.0\t2.0\n")
    with pytest.raises(DataError, match=r"expected 8 lines"):
        get_dataset("rafdb", root)
    with pytest.raises(ConfigError, match=r"option images: expected one of \['aligned', 'original'\]"):
        get_dataset("rafdb", root, images="crop")


# ---------------------------------------------------------------------------------------------------------------------
# AffectNet


@pytest.mark.parametrize("classes", [8, 7])
def test_affectnet_csv_release(tmp_path, classes):
    root = formats.write_affectnet_csv(tmp_path / "aff")
    info = get_dataset("affectnet", root, classes=classes)
    assert info.layout.startswith("csv release") and info.crop_to_bbox
    summary = describe_dataset(info)
    assert summary["splits"]["train"]["total"] == classes and summary["splits"]["test"]["total"] == classes
    assert "val" not in summary["splits"]
    expected_drops = {
        "none (code 8)": 2,
        "uncertain (code 9)": 2,
        "non-face (code 10)": 2,
        "NULL value": 1,
        "negative or zero face size": 1,
    }
    if classes == 7:
        expected_drops["contempt (not in basic7)"] = 2
    assert summary["dropped"] == expected_drops
    native = _native_to_expression(info)
    assert native == {str(k): v for k, v in AFFECTNET_CODES.items() if k < classes}
    row = info.manifest.iloc[0]
    assert row["bbox"] == [8.0, 8.0, 56.0, 56.0] and landmarks_array(row["landmarks"]).shape == (68, 2)
    assert row["valence"] == 0.25 and row["arousal"] == -0.5
    # the transform input is the face crop (48 px), with landmarks shifted into it
    dataset = FaceDataset.from_info(
        info, "train", transform=create_transform(train=False, img_size=32), return_landmarks=True
    )
    assert dataset.load_image(0).shape == (48, 48, 3)
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["landmarks"].shape == (68, 2)
    shifted = (landmarks_array(row["landmarks"]) - 8) * 32 / 48  # crop at (8, 8), then 48 -> 32 px
    assert np.allclose(item["landmarks"].numpy(), shifted, atol=0.5)


def test_affectnet_csv_bad_lines(tmp_path):
    root = formats.write_affectnet_csv(tmp_path / "aff")
    path = root / "Manually_Annotated_file_lists" / "validation.csv"
    lines = path.read_text().splitlines()
    bad = lines[0].rsplit(",", 1)[0]  # 8 fields
    path.write_text("\n".join([bad, *lines[1:]]))
    with pytest.raises(DataError, match=r"validation.csv:1: expected 9 comma-separated fields"):
        get_dataset("affectnet", root)
    fields = lines[1].split(",")
    fields[6] = "12"
    path.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]))
    with pytest.raises(DataError, match=r"validation.csv:2: expression 12 is not an AffectNet code 0..10"):
        get_dataset("affectnet", root)
    fields = lines[1].split(",")
    fields[5] = fields[5].rsplit(";", 1)[0]
    path.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]))
    with pytest.raises(DataError, match=r"validation.csv:2: facial_landmarks has 135 numbers, expected 136"):
        get_dataset("affectnet", root)
    with pytest.raises(ConfigError, match=r"option classes: expected one of \[7, 8\], got 6"):
        get_dataset("affectnet", root, classes=6)


def test_affectnet_npy_and_folder_releases(tmp_path):
    info = get_dataset("affectnet", formats.write_affectnet_npy(tmp_path / "npy"))
    assert info.layout.startswith("npy release")
    assert describe_dataset(info)["splits"]["test"]["total"] == 8
    assert _native_to_expression(info) == {str(k): v for k, v in AFFECTNET_CODES.items() if k < 8}
    row = info.manifest.iloc[0]
    assert row["valence"] == 0.5 and row["arousal"] == -0.25 and len(row["landmarks"]) == 136
    info7 = get_dataset("affectnet", formats.write_affectnet_folders(tmp_path / "folders"), classes=7)
    assert info7.layout.startswith("image folders")
    assert describe_dataset(info7)["splits"] == {
        "train": {"total": 7, "per_label": dict.fromkeys(info7.label_space.names, 1)},
        "test": {"total": 7, "per_label": dict.fromkeys(info7.label_space.names, 1)},
    }
    assert info7.dropped == {"contempt (not in basic7)": 2}
    assert _native_to_expression(info7) == {str(k): v for k, v in AFFECTNET_CODES.items() if k < 7}


# ---------------------------------------------------------------------------------------------------------------------
# FERPlus and FER2013

# Hand-computed from formats.FERPLUS_ROWS (see the comments there) under the rules of the official ferplus.py.
FERPLUS_TRAIN = {
    "majority": ["fer0000000", "fer0000001", "fer0000007"],
    "crossentropy": [
        "fer0000000",
        "fer0000001",
        "fer0000002",
        "fer0000006",
        "fer0000007",
        "fer0000013",
    ],
    "probability": [
        "fer0000000",
        "fer0000001",
        "fer0000002",
        "fer0000006",
        "fer0000007",
        "fer0000013",
    ],
    "multi_target": ["fer0000000", "fer0000001", "fer0000002", "fer0000006", "fer0000007"],
    "argmax": [
        "fer0000000",
        "fer0000001",
        "fer0000002",
        "fer0000004",
        "fer0000006",
        "fer0000007",
        "fer0000013",
    ],
}


@pytest.mark.parametrize("mode", list(FERPLUS_TRAIN))
def test_ferplus_csv_sizes_under_every_mode(tmp_path, mode):
    root = formats.write_ferplus_csv(tmp_path / "fp")
    info = get_dataset("ferplus", root, mode=mode)
    assert info.layout.startswith("csv") and "votes from fer2013new" in info.splits
    assert sorted(info.split("train")["image_id"]) == FERPLUS_TRAIN[mode]
    # val and test always use majority
    assert info.split("val")["image_id"].tolist() == ["fer0000008"]
    assert info.split("test")["image_id"].tolist() == ["fer0000010"]
    assert _expressions(info, "val") == ["fear"] and _expressions(info, "test") == ["anger"]
    assert info.dropped["blank image name (excluded by FER+)"] == 2
    assert info.dropped["duplicate image name (a later row reuses it)"] == 1
    assert info.dropped["no majority (test)"] == 1
    # the later of the two fer0000007.png rows wins: contempt
    assert info.manifest.set_index("image_id").loc["fer0000007", "expression"] == "contempt"
    # images come from the pixel strings, paired by row order (fer0000010.png is data row 10)
    assert info.manifest.set_index("image_id").loc["fer0000010", "array_index"] == 10
    assert info.extra("images").shape == (14, 48, 48)
    assert set(describe_dataset(info)) == DESCRIBE_KEYS


def test_ferplus_targets_match_hand_computation():
    t, _ = ferplus_target([0, 3, 3, 3, 0, 0, 0, 0, 0, 0], "crossentropy")  # the row that sums to 9
    assert t.round(4).tolist() == [0, 0.3333, 0.3333, 0.3333, 0, 0, 0, 0]  # happiness, sadness, surprise
    t, _ = ferplus_target([4, 2, 2, 0, 0, 0, 0, 0, 0, 2], "crossentropy")  # NF tie removed after 3 classes
    assert t.tolist() == [0.5, 0.25, 0, 0.25, 0, 0, 0, 0]
    assert ferplus_target([4, 2, 2, 0, 0, 0, 0, 0, 0, 2], "multi_target")[1] == "too spread (multi_target)"
    assert ferplus_target([0, 0, 0, 0, 0, 0, 0, 0, 6, 4], "majority")[1] == "unknown wins"
    assert ferplus_target([0, 0, 0, 0, 0, 0, 0, 0, 4, 6], "argmax")[1] == "NF wins"
    t, _ = ferplus_target([6, 0, 0, 4, 0, 0, 0, 0, 0, 0], "multi_target")
    assert t.tolist() == [0.6, 0, 0.4, 0, 0, 0, 0, 0]


def test_ferplus_soft_targets_and_votes_kept(tmp_path):
    info = get_dataset("ferplus", formats.write_ferplus_csv(tmp_path / "fp"), mode="crossentropy")
    assert info.target_kind == "soft"
    row = info.manifest.set_index("image_id").loc["fer0000001"]
    assert row["votes"] == [6, 0, 0, 4, 0, 0, 0, 0, 0, 0]
    assert row["soft_target"] == pytest.approx([0.6, 0, 0.4, 0, 0, 0, 0, 0])  # canonical order: sadness is 2
    assert row["vote_distribution"] == pytest.approx([0.6, 0, 0.4, 0, 0, 0, 0, 0])
    dataset = FaceDataset.from_info(info, "train", transform=create_transform(train=True, img_size=32), train=True)
    item = dataset[1]
    assert item["target"].shape == (8,) and math.isclose(float(item["target"].sum()), 1.0, rel_tol=1e-6)
    sampled = get_dataset("ferplus", formats.write_ferplus_csv(tmp_path / "fp2"), mode="probability")
    one_hot = FaceDataset.from_info(sampled, "train", transform=create_transform(train=True, img_size=32), train=True)[
        1
    ]["target"]
    assert sorted(one_hot.tolist()) == [0] * 7 + [1]


def test_ferplus_generated_folders_and_votes_source(tmp_path):
    root = formats.write_ferplus_folders(tmp_path / "fp")
    info = get_dataset("ferplus", root)  # label.csv by default, as the official trainer
    assert info.layout.startswith("generated folders") and "votes from label_csv" in info.splits
    by_id = info.manifest.set_index("image_id")
    assert by_id.loc["fer0000001", "expression"] == "sadness"  # label.csv disagrees with fer2013new.csv
    assert by_id.loc["fer0000001", "path"] == "FER2013Train/fer0000001.png"
    assert sorted(info.split("train")["image_id"]) == FERPLUS_TRAIN["majority"]
    other = get_dataset("ferplus", root, votes_source="fer2013new")
    assert other.manifest.set_index("image_id").loc["fer0000001", "expression"] == "neutral"
    assert verify_images(info)["problems"] == []
    # the csv layout can take its votes from label.csv files too (matched by name)
    csv_root = formats.write_ferplus_csv(tmp_path / "csv")
    for folder in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        (csv_root / "data" / folder).mkdir(parents=True)
        (csv_root / "data" / folder / "label.csv").write_text((root / folder / "label.csv").read_text())
    mixed = get_dataset("ferplus", csv_root, votes_source="label_csv")
    assert mixed.manifest.set_index("image_id").loc["fer0000001", "expression"] == "sadness"


def test_ferplus_bad_input(tmp_path):
    root = formats.write_ferplus_csv(tmp_path / "fp")
    path = root / "fer2013new.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], lines[3].replace(",5,5,", ",5,a,"), *lines[4:]]))
    with pytest.raises(DataError, match=r"fer2013new.csv:4: expected 10 non-negative vote counts"):
        get_dataset("ferplus", root)
    path.write_text("\n".join([*lines[:3], lines[3].replace("Training", "PublicTest"), *lines[4:]]))
    with pytest.raises(DataError, match=r"fer2013new.csv:4: Usage is val but line 4 of fer2013.csv is train"):
        get_dataset("ferplus", root)
    path.write_text("\n".join(lines[:-1]))
    with pytest.raises(DataError, match=r"13 data rows but .*fer2013.csv has 14"):
        get_dataset("ferplus", root)
    with pytest.raises(ConfigError, match=r"option mode: expected one of"):
        get_dataset("ferplus", root, mode="soft")


def test_fer2013_csv_and_folders(tmp_path):
    rows = [(usage, code) for usage in ("Training", "PublicTest", "PrivateTest") for code in range(7)]
    root = formats.write_fer2013_csv(tmp_path / "fer", rows, bad_pixels_line=5)
    info = get_dataset("fer2013", root)
    summary = describe_dataset(info)
    assert {s: v["total"] for s, v in summary["splits"].items()} == {"train": 7, "val": 7, "test": 7}
    assert _native_to_expression(info) == {str(k): v for k, v in FER2013_CODES.items()}
    with pytest.raises(DataError, match=r"fer2013.csv:5: pixels must be 2304 values"):
        info.extra("images")
    folders = get_dataset("fer2013", formats.write_class_folders(tmp_path / "kaggle"))
    assert folders.layout.startswith("class-name folders")
    assert describe_dataset(folders)["splits"]["test"]["per_label"] == dict.fromkeys(folders.label_space.names, 2)
    (tmp_path / "fer" / "fer2013.csv").write_text("emotion,pixels,Usage\n3,1 2 3,Train\n")
    with pytest.raises(DataError, match=r"fer2013.csv:2: Usage 'Train' is not one of"):
        get_dataset("fer2013", root)


# ---------------------------------------------------------------------------------------------------------------------
# InFER, folder, csv


def test_infer_generated_subject_grouped_folds(tmp_path):
    root = formats.write_infer(tmp_path / "infer")
    info = get_dataset("infer", root, fold=3)
    assert "InFER 10-fold (fer_bench folds)" in info.splits and "grouped by subject" in info.splits
    assert info.layout == "class-name folders + metadata.csv"
    folds = info.manifest["fold"].to_numpy()
    assert set(folds) == set(range(10))
    # no subject in two folds; every fold sees every class at most once per subject
    assert (info.manifest.groupby("subject_id")["fold"].nunique() == 1).all()
    assert (info.manifest["split"] == "test").sum() == (folds == 3).sum() > 0
    assert describe_dataset(info)["groups"]["gender"] == {"female": 42, "male": 42}
    again = get_dataset("infer", root, fold=3)
    assert (again.manifest["fold"] == info.manifest["fold"]).all()  # fixed seed
    with pytest.raises(ConfigError, match=r"option fold: expected one of"):
        get_dataset("infer", root, fold=10)


def test_infer_metadata_folds_and_metadata_only(tmp_path):
    root = formats.write_infer(tmp_path / "infer", with_fold=True)
    info = get_dataset("infer", root, fold=0)
    assert "metadata.csv folds" in info.splits
    assert set(info.split("test")["subject_id"]) == {"S00", "S10"}
    for folder in (root / "images").iterdir():  # metadata alone (file + label) also works
        for image in folder.iterdir():
            image.rename(root / "images" / f"{folder.name}__{image.name}")
        folder.rmdir()
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text().replace("/s", "__s"))
    assert len(get_dataset("infer", root).manifest) == 84
    meta.write_text(meta.read_text().replace("anger__s00_anger.jpg,anger", "anger__s00_anger.jpg,grumpy"))
    with pytest.raises(DataError, match=r"metadata.csv:2: label 'grumpy' is not an expression name"):
        get_dataset("infer", root)


def test_folder_and_csv_custom_data(tmp_path):
    root = formats.write_class_folders(tmp_path / "f", splits=("train", "test"), names=("Angry", "HAPPY", "contempt"))
    info = get_dataset("folder", root)
    assert info.label_space.name == "all8"
    assert _native_to_expression(info) == {"Angry": "anger", "HAPPY": "happiness", "contempt": "contempt"}
    flat = formats.write_class_folders(tmp_path / "flat", splits=("",), names=("afraid", "sad"))
    flat_info = get_dataset("folder", flat)
    assert flat_info.label_space.name == "basic7" and set(flat_info.manifest["split"]) == {"test"}
    (flat / "other").mkdir()
    with pytest.raises(DataError, match=r"other: folder name 'other' is not a folder dataset class"):
        get_dataset("folder", flat)

    table = tmp_path / "c" / "labels.csv"
    formats.write_class_folders(tmp_path / "c", splits=("img",), names=("x",), per_class=3)
    images = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*.png"))
    table.write_text(
        "path,label,split,gender\n"
        + "\n".join(
            f"{p},{lab},{s},{g}"
            for p, lab, s, g in zip(
                images, ["Happy", "surprised", "neutral"], ["train", "", "test"], ["f", "m", ""], strict=True
            )
        )
        + "\n"
    )
    info = get_dataset("csv", tmp_path / "c", group_columns="gender")
    assert info.manifest["split"].tolist() == ["train", "test", "test"]
    assert describe_dataset(info)["groups"] == {"gender": {"f": 1, "m": 1, "unknown": 1}}
    table.write_text(table.read_text().replace("surprised", "joyful"))
    with pytest.raises(DataError, match=r"labels.csv:3: label 'joyful' is not an expression name"):
        get_dataset("csv", tmp_path / "c")
    with pytest.raises(ConfigError, match=r"column 'sex' not found"):
        get_dataset("csv", tmp_path / "c", group_columns="sex")
    table.write_text("path,label\n../../etc/passwd,happy\n")
    with pytest.raises(DataError, match=r"labels.csv:2: path '../../etc/passwd' must be a path inside the root"):
        get_dataset("csv", tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------------------
# Errors shared by all adapters


@pytest.mark.parametrize("name", list_datasets())
def test_an_empty_root_lists_the_layouts_looked_for(tmp_path, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        get_dataset(name, empty)
    message = str(caught.value)
    assert str(empty) in message, message  # names the folder it searched
    assert re.search(r"looked for|not found", message, re.IGNORECASE), message  # and what it expected there


def test_unknown_option_and_missing_root(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'clases'. Did you mean 'classes'"):
        get_dataset("affectnet", tmp_path, clases=7)
    with pytest.raises(DataError, match=r"--root .*nowhere: folder does not exist"):
        get_dataset("rafdb", tmp_path / "nowhere")


@pytest.mark.parametrize("name", list_datasets())
def test_describe_json_is_serialisable_for_every_adapter(tmp_path, name):
    root, options = formats.dataset_tree(name, tmp_path / name)
    info = get_dataset(name, root, **options)
    summary = json.loads(json.dumps(describe_dataset(info)))
    assert set(summary) == DESCRIBE_KEYS
    assert summary["dataset"] == name and sum(split["total"] for split in summary["splits"].values()) > 0
