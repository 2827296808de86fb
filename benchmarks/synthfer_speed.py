"""SynthFER rendering and loading speed.

Prints images/s for rendering SynthFER with 1 process (the plain baseline) and with all cores, and for the training
data path (decode + albumentations) with and without the in-memory image cache, with ratios against the baselines
measured in the same process.

    .venv/bin/python benchmarks/synthfer_speed.py [--n 1500] [--size 112] [--img-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fer_bench.data import FaceDataset, SynthFERConfig, create_transform, generate_synthfer, get_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1500, help="images to render (all in the train split)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--img-size", type=int, default=64, help="training resolution for the loader test")
    args = parser.parse_args()
    config = SynthFERConfig(size=args.size, n_train=args.n, n_val=0, n_test=0)
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for workers in (1, os.cpu_count() or 1):
            t0 = time.perf_counter()
            generate_synthfer(out=Path(tmp) / f"w{workers}", config=config, workers=workers)
            timings[workers] = time.perf_counter() - t0
        base = timings[1]
        for workers, seconds in timings.items():
            ratio = base / seconds
            rate = args.n / seconds
            print(f"render  workers={workers:<3d} {rate:8.1f} img/s  ({seconds:.1f} s; x{ratio:.2f} vs 1 worker)")
        default_seconds = 9000 / (args.n / min(timings.values()))
        print(f"        -> default SynthFER (9000 images) ≈ {default_seconds:.0f} s")

        info = get_dataset("synthfer", Path(tmp) / "w1")
        rows = info.split("train")
        results = {}
        for cached in (False, True):
            ds = FaceDataset(
                rows,
                root=info.root,
                transform=create_transform(train=True, img_size=args.img_size),
                hflip=0.5,
                cache_images=cached,
            )
            if cached:
                for i in range(len(ds)):
                    ds.load_image(i)
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            results[cached] = len(ds) / (time.perf_counter() - t0)
        for cached, rate in results.items():
            print(f"loader  cache={cached!s:<5} {rate:8.1f} img/s  (x{rate / results[False]:.2f} vs no cache)")


if __name__ == "__main__":
    main()
