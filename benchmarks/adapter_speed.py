"""How long the adapters take to read full-size label files (no images needed), against pandas.read_csv of the same
file as the plain baseline, measured in the same process.

* AffectNet ``training.csv`` at its real size (~414,800 rows with 136-number landmark strings), written synthetic;
* FER2013 ``fer2013.csv`` (35,887 rows of 2,304 pixels) parsed into the in-memory image array FERPlus/FER2013 use.

    .venv/bin/python benchmarks/adapter_speed.py [--affectnet-rows 414800] [--fer-rows 35887]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from fer_bench.data.adapters.affectnet import read_affectnet_csv
from fer_bench.data.adapters.fer2013 import fer2013_pixels

HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"


def write_affectnet(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    landmarks = ";".join(f"{v:.2f}" for v in rng.uniform(20, 200, 136))  # one string reused: parsing cost is the same
    with path.open("w") as handle:
        handle.write(HEADER)
        for i in range(rows):
            handle.write(f"{i % 1000}/{i:056x}.jpg,30,30,200,200,{landmarks},{i % 11},0.1,-0.2\n")


def write_fer2013(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    pixels = " ".join(str(v) for v in rng.integers(0, 256, 2304))
    usages = ("Training", "PublicTest", "PrivateTest")
    with path.open("w") as handle:
        handle.write("emotion,pixels,Usage\n")
        for i in range(rows):
            handle.write(f"{i % 7},{pixels},{usages[i % 3]}\n")


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--affectnet-rows", type=int, default=414_800)
    parser.add_argument("--fer-rows", type=int, default=35_887)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "training.csv"
        write_affectnet(csv_path, args.affectnet_rows)
        base, _ = timed(lambda: pd.read_csv(csv_path))
        ours, rows = timed(lambda: read_affectnet_csv(csv_path, split="train", image_dir="x", dropped=Counter()))
        print(
            f"AffectNet training.csv, {args.affectnet_rows:,} rows ({csv_path.stat().st_size / 2**20:.0f} MiB): "
            f"pandas.read_csv {base:.1f} s (baseline, strings only); fer_bench adapter {ours:.1f} s "
            f"(x{ours / base:.2f}; {len(rows):,} rows kept, landmark counts checked (parsed on use), drops counted)"
        )
        fer_path = Path(tmp) / "fer2013.csv"
        write_fer2013(fer_path, args.fer_rows)
        base, _ = timed(lambda: pd.read_csv(fer_path))
        ours, images = timed(lambda: fer2013_pixels(fer_path))
        print(
            f"fer2013.csv, {args.fer_rows:,} rows ({fer_path.stat().st_size / 2**20:.0f} MiB): pandas.read_csv "
            f"{base:.1f} s (baseline, pixel strings unparsed); fer_bench pixels -> uint8 {images.shape} {ours:.1f} s "
            f"(x{ours / base:.2f})"
        )


if __name__ == "__main__":
    main()
