"""Writers of tiny dataset trees in each owner's real format (generated images, hand-written label files).

Every quirk the adapters must handle is here on purpose; the expected counts are computed by hand in the tests.
Nothing from a licensed dataset is used: images are random noise with a drawn ellipse.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)
FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
CLASS_FOLDERS = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")  # synonyms, 7 classes


def write_image(path: Path, *, seed: int, size: int = 32, grey: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 200, size=(size, size, 3), dtype=np.uint8)
    cv2.ellipse(image, (size // 2, size // 2), (size // 3, size // 2 - 2), 0, 0, 360, (200, 170, 150), -1)
    if grey:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def manual_attributes(*, gender: int, race: int, age: int, sep: str = "\t") -> str:
    points = [(30.5, 40.25), (60.0, 41.0), (45.0, 55.5), (35.0, 70.0), (58.0, 71.0)]
    return "".join(f"{x}{sep}{y}\n" for x, y in points) + f"{gender}\n{race}\n{age}\n"


# ---------------------------------------------------------------------------------------------------------------------
# RAF-DB


def write_rafdb_official(root: Path, *, per_code_train: int = 2, per_code_test: int = 1) -> Path:
    """``root/basic/`` with every code 1..7 in both splits, manual files with tabs and with spaces, one missing
    (train_00003), one auto and one bounding-box file, plus the three RAN list files at ``root``."""
    base = root / "basic"
    lines, n_train, n_test = [], 0, 0
    for code in range(1, 8):
        for _ in range(per_code_train):
            n_train += 1
            lines.append(f"train_{n_train:05d}.jpg {code}")
        for _ in range(per_code_test):
            n_test += 1
            lines.append(f"test_{n_test:04d}.jpg {code}")
    (base / "EmoLabel").mkdir(parents=True)
    (base / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, line in enumerate(lines):
        stem = line.split()[0][:-4]
        write_image(base / "Image" / "aligned" / f"{stem}_aligned.jpg", seed=i)
        if stem == "train_00003":
            continue  # a missing annotation file must not be fatal
        sep = "\t" if i % 2 == 0 else " "
        manual = base / "Annotation" / "manual" / f"{stem}_manu_attri.txt"
        manual.parent.mkdir(parents=True, exist_ok=True)
        manual.write_text(manual_attributes(gender=i % 3, race=i % 3, age=i % 5, sep=sep))
    auto = base / "Annotation" / "auto" / "test_0001_auto_attri.txt"
    auto.parent.mkdir(parents=True)
    auto.write_text("".join(f"{10 + k}\t{20 + k}\n" for k in range(37)))
    box = base / "Annotation" / "boundingbox" / "test_0001_boundingbox.txt"
    box.parent.mkdir(parents=True)
    box.write_text("260.237671 187.152115 479.177979 516.473022 \n")
    # RAN lists: 0-based RAF labels; test_0001 has code 1 (surprise -> 0), test_0002 code 2 (fear -> 1), ...
    (root / "rafdb_occlusion_list.txt").write_text("test_0001_aligned 0 3\ntest_0003_aligned 2 1\n")
    (root / "val_raf_db_list.txt").write_text(
        "1/test_0002_aligned.jpg\n3/test_0004_aligned.jpg\n4/test_0005_aligned.jpg\n"
    )
    (root / "val_raf_db_list_45.txt").write_text("1/test_0002_aligned.jpg\n")
    return root


def write_rafdb_community(root: Path, *, names: bool = False, per_code: int = 2) -> Path:
    """Kaggle ``DATASET/{train,test}/{1..7}/`` (or class-name folders) with the label CSVs."""
    seed = 0
    for split in ("train", "test"):
        rows = [("image", "label")]
        for code in range(1, 8):
            raf_names = ("surprised", "fearful", "disgusted", "happy", "sad", "angry", "neutral")
            folder = raf_names[code - 1] if names else str(code)
            for _ in range(per_code):
                seed += 1
                name = f"{split}_{seed:04d}_aligned.jpg"
                write_image(root / "DATASET" / split / folder / name, seed=seed)
                rows.append((name, str(code)))
        with (root / f"{split}_labels.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return root


def write_rafdb_compound(root: Path) -> Path:
    base = root / "compound"
    lines = [f"train_{i:04d}.jpg {i}" for i in range(1, 12)] + ["test_001.jpg 11", "test_002.jpg 1"]
    (base / "EmoLabel").mkdir(parents=True)
    (base / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, line in enumerate(lines):
        write_image(base / "Image" / "aligned" / f"{line.split()[0][:-4]}_aligned.jpg", seed=i)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# AffectNet


def _landmarks(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    return ";".join(f"{v:.2f}" for v in rng.uniform(8, size - 8, 136))


def write_affectnet_csv(root: Path, *, per_code: int = 1) -> Path:
    """The csv release: training.csv with a header, validation.csv without; codes 0..10, a NULL row and a
    negative face width in training.csv; images 64 px with the face box (8, 8, 48, 48)."""
    image_dir = root / "Manually_Annotated" / "Manually_Annotated_Images"
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    seed = 0

    def row(code: int, *, width: int = 48, landmarks: str | None = None) -> str:
        nonlocal seed
        seed += 1
        name = f"{seed % 3}/{seed:056x}.jpg"
        write_image(image_dir / name, seed=seed, size=64)
        return f"{name},8,8,{width},48,{landmarks or _landmarks(seed)},{code},0.25,-0.5"

    train = [AFFECTNET_HEADER] + [row(code) for code in range(11) for _ in range(per_code)]
    train.append(row(1).replace(",0.25,-0.5", ",NULL,NULL"))  # a dirty row
    train.append(row(2, width=-1))  # a negative face size
    (lists / "training.csv").write_text("\n".join(train) + "\n")
    val = [row(code) for code in range(11) for _ in range(per_code)]  # no header line
    (lists / "validation.csv").write_text("\n".join(val) + "\n")
    return root


def write_affectnet_npy(root: Path, *, per_code: int = 1) -> Path:
    """The npy release: ``{train_set,val_set}/images/N.jpg`` + ``annotations/N_{exp,val,aro,lnd}.npy``."""
    index = 0
    for folder in ("train_set", "val_set"):
        for code in range(8):
            for _ in range(per_code):
                index += 1
                write_image(root / folder / "images" / f"{index}.jpg", seed=index)
                ann = root / folder / "annotations"
                ann.mkdir(parents=True, exist_ok=True)
                np.save(ann / f"{index}_exp.npy", np.array(str(code)))  # the release stores strings
                np.save(ann / f"{index}_val.npy", np.array("0.5"))
                np.save(ann / f"{index}_aro.npy", np.array("-0.25"))
                np.save(ann / f"{index}_lnd.npy", np.arange(136, dtype=np.float64))
    return root


def write_affectnet_folders(root: Path, *, per_code: int = 1) -> Path:
    seed = 0
    for split in ("train", "val"):
        for code in range(8):
            for _ in range(per_code):
                seed += 1
                write_image(root / split / str(code) / f"{seed:056x}.jpg", seed=seed)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# FER2013 and FERPlus

#: (Usage, Image name, votes neutral..NF) — the hand-computed excerpt (see test_adapters.py for the expected sizes).
FERPLUS_ROWS: list[tuple[str, str, list[int]]] = [
    ("Training", "fer0000000.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # every mode: neutral
    ("Training", "fer0000001.png", [6, 0, 0, 4, 0, 0, 0, 0, 0, 0]),  # every mode keeps it (6 > 5)
    ("Training", "fer0000002.png", [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]),  # majority drops (5 !> 5); others keep
    ("Training", "", [4, 0, 0, 0, 6, 0, 0, 0, 0, 0]),  # blank name: excluded by FER+
    ("Training", "fer0000004.png", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # all single votes: only argmax keeps
    ("Training", "fer0000005.png", [0, 0, 0, 0, 0, 0, 0, 0, 6, 4]),  # unknown wins: dropped everywhere
    ("Training", "fer0000006.png", [0, 3, 3, 3, 0, 0, 0, 0, 0, 0]),  # sums to 9; majority drops
    ("Training", "fer0000007.png", [0, 0, 0, 0, 8, 2, 0, 0, 0, 0]),  # name reused by a later row
    ("PublicTest", "fer0000008.png", [0, 0, 0, 0, 0, 0, 7, 3, 0, 0]),
    ("Training", "fer0000007.png", [0, 0, 0, 0, 0, 0, 0, 9, 1, 0]),
    ("PrivateTest", "fer0000010.png", [0, 0, 2, 0, 8, 0, 0, 0, 0, 0]),
    ("PrivateTest", "fer0000011.png", [4, 4, 0, 0, 0, 0, 0, 0, 2, 0]),  # no majority: dropped (test)
    ("PublicTest", "", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("Training", "fer0000013.png", [4, 2, 2, 0, 0, 0, 0, 0, 0, 2]),  # CE/probability/argmax keep; majority, multi drop
]
#: label.csv disagrees with fer2013new.csv for fer0000001.png (sadness wins there).
LABEL_CSV_OVERRIDES = {"fer0000001.png": [4, 0, 0, 6, 0, 0, 0, 0, 0, 0]}


def _pixels(seed: int) -> str:
    return " ".join(str(v) for v in np.random.default_rng(seed).integers(0, 256, 48 * 48))


def clean_ferplus_rows(per_class: int) -> list[tuple[str, str, list[int]]]:
    """Extra rows with a clear 8-of-10 majority, ``per_class`` per emotion and usage (for training smoke tests)."""
    rows = []
    for usage in ("Training", "PublicTest", "PrivateTest"):
        for emotion in range(8):
            for k in range(per_class):
                votes = [0] * 10
                votes[emotion], votes[(emotion + 1) % 8] = 8, 2
                rows.append((usage, f"fer1{usage[:2]}{emotion}{k:04d}.png", votes))
    return rows


def write_fer2013_csv(root: Path, rows: list[tuple[str, int]], *, bad_pixels_line: int | None = None) -> Path:
    """``fer2013.csv`` (emotion, pixels, Usage) for (Usage, emotion code) rows."""
    lines = ["emotion,pixels,Usage"]
    for i, (usage, code) in enumerate(rows):
        pixels = _pixels(i)
        if bad_pixels_line == i + 2:
            pixels = pixels.rsplit(" ", 1)[0]  # 2,303 values
        lines.append(f"{code},{pixels},{usage}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "fer2013.csv").write_text("\n".join(lines) + "\n")
    return root


def write_ferplus_csv(root: Path, *, per_class: int = 0) -> Path:
    rows = FERPLUS_ROWS + clean_ferplus_rows(per_class)
    write_fer2013_csv(root, [(usage, i % 7) for i, (usage, _, _) in enumerate(rows)])
    lines = [FERPLUS_HEADER] + [f"{u},{n}," + ",".join(map(str, v)) for u, n, v in rows]
    (root / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    return root


def write_ferplus_folders(root: Path, *, per_class: int = 0, with_new_csv: bool = True) -> Path:
    """``FER2013{Train,Valid,Test}/label.csv`` + 48 px PNGs as generate_training_data.py writes them (unique names,
    blank names skipped, the later duplicate wins); label.csv votes differ for fer0000001.png."""
    folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}
    rows = FERPLUS_ROWS + clean_ferplus_rows(per_class)
    latest = {name: (usage, votes) for usage, name, votes in rows if name}
    labels: dict[str, list[str]] = {f: [] for f in folders.values()}
    for i, (name, (usage, votes)) in enumerate(latest.items()):
        folder = folders[usage]
        write_image(root / folder / name, seed=i, size=48, grey=True)
        votes = LABEL_CSV_OVERRIDES.get(name, votes)
        labels[folder].append(f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, votes)))
    for folder, lines in labels.items():
        (root / folder / "label.csv").write_text("\n".join(lines) + "\n")
    if with_new_csv:
        lines = [FERPLUS_HEADER] + [f"{u},{n}," + ",".join(map(str, v)) for u, n, v in rows]
        (root / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    return root


def write_class_folders(
    root: Path,
    *,
    splits: tuple[str, ...] = ("train", "test"),
    per_class: int = 2,
    names: tuple[str, ...] = CLASS_FOLDERS,
    ext: str = ".png",
) -> Path:
    seed = 0
    for split in splits:
        for name in names:
            for _ in range(per_class):
                seed += 1
                write_image((root / split if split else root) / name / f"img{seed:04d}{ext}", seed=seed)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# InFER


def write_infer(root: Path, *, subjects: int = 12, with_fold: bool = False) -> Path:
    """``images/<class>/`` with one image per subject and expression, and a metadata.csv (mixed-case header)."""
    lines = ["File,Expression,Subject_ID,Age,Gender,Ethnicity,Source" + (",Fold" if with_fold else "")]
    classes = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    seed = 0
    for subject in range(subjects):
        for name in classes:
            seed += 1
            rel = f"{name}/s{subject:02d}_{name}.jpg"
            write_image(root / "images" / rel, seed=seed)
            fold = f",{subject % 10}" if with_fold else ""
            gender = "female" if subject % 2 else "male"
            lines.append(f"{rel},{name},S{subject:02d},{20 + subject},{gender},region{subject % 3},posed{fold}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Custom CSV, SynthFER, and one fixture tree per registered dataset


def write_csv_table(root: Path) -> Path:
    """``labels.csv`` (path, label, split, gender) over three images under ``img/``."""
    write_class_folders(root, splits=("img",), names=("x",), per_class=3)
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = zip(images, ("Happy", "surprised", "neutral"), ("train", "", "test"), ("f", "m", ""), strict=True)
    (root / "labels.csv").write_text("path,label,split,gender\n" + "".join(f"{','.join(r)}\n" for r in rows))
    return root


def write_synthfer(root: Path) -> Path:
    from fer_bench.data import SynthFERConfig, generate_synthfer

    generate_synthfer(out=root, config=SynthFERConfig(seed=1, size=32, n_train=16, n_val=8, n_test=16), workers=1)
    return root


# name -> (write the tree, adapter options): every registered dataset must have one (tests parametrise over
# fer_bench.data.list_datasets(), so a newly registered adapter fails here until it gets a fixture tree).
DATASET_TREES = {
    "rafdb": (write_rafdb_official, {}),
    "rafdb-compound": (write_rafdb_compound, {}),
    "affectnet": (write_affectnet_csv, {"classes": 7}),
    "ferplus": (write_ferplus_csv, {"mode": "crossentropy"}),
    "fer2013": (write_class_folders, {}),
    "infer": (write_infer, {"fold": 2}),
    "folder": (lambda root: write_class_folders(root, splits=("train",)), {}),
    "csv": (write_csv_table, {}),
    "synthfer": (write_synthfer, {}),
}


def dataset_tree(name: str, root: Path) -> tuple[Path, dict]:
    """A small tree in dataset ``name``'s own format at ``root``, and the adapter options to read it with."""
    assert name in DATASET_TREES, f"dataset {name!r} is registered but tests/formats.py has no fixture tree for it"
    write, options = DATASET_TREES[name]
    return write(root), dict(options)
