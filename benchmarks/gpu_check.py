"""GPU check, the parts that need a GPU beyond the throughput table (benchmarks/train_throughput.py):

1. ``recipe``: a real recipe end to end for ``--minutes`` minutes: ViT-B/16 as ``recipes/rafdb_vit_b16.yaml`` (224 px,
   bf16, layer decay, random erasing) on SynthFER rendered at 224 px, through the prepared cache and the device
   loader; prints images/s per epoch, the loader and residency used, peak memory and the test report.
2. ``ddp``: the 2-process DDP check on one GPU: a tiny recipe trained by one process and by two (torchrun, both
   processes sharing the GPU), with NCCL, falling back to gloo on CUDA tensors if NCCL refuses two ranks on one
   device; the validation figures must agree.

    python benchmarks/gpu_check.py recipe [--minutes 2] [--out DIR]
    python benchmarks/gpu_check.py ddp [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_recipe(out: Path, *, minutes: float, n_train: int) -> dict:
    from fer_bench.data import SynthFERConfig, generate_synthfer
    from fer_bench.train import fit, load_recipe

    root = out / "synthfer224"
    if not root.exists():
        started = time.time()
        config = SynthFERConfig(size=224, n_train=n_train, n_val=1000, n_test=2000)
        generate_synthfer(out=root, config=config)
        print(f"SynthFER at 224 px rendered in {time.time() - started:.0f} s", flush=True)
    os.environ.setdefault("FER_BENCH_CACHE_DIR", str(out / "cache"))
    torch.cuda.reset_peak_memory_stats()
    recipe = load_recipe(
        REPO / "recipes" / "rafdb_vit_b16.yaml",
        [
            "data.dataset=synthfer",
            f"data.root={root}",
            "data.options={}",
            "model.pretrained=false",  # nothing can be downloaded there; the architecture is the recipe's own
            "optim.epochs=200",
            f"runtime.max_minutes={minutes}",
            "tracking.enabled=false",
            f"output_dir={out / 'run'}",
        ],
    )
    started = time.time()
    result = fit(recipe)
    resolved = yaml.safe_load((out / "run" / "recipe.resolved.yaml").read_text())["_resolved"]
    row = {
        "recipe": "rafdb_vit_b16 on SynthFER 224 px",
        "device": torch.cuda.get_device_name(),
        "loader": resolved["loader"],
        "residency": resolved["residency"],
        "precision": resolved["precision"],
        "epochs": len(result.summary),
        "img_per_s_by_epoch": [r["img_per_s"] for r in result.summary],
        "epoch_seconds": [r["seconds"] for r in result.summary],
        "val_acc": [round(r["val_acc"], 4) for r in result.summary],
        "wall_s": round(time.time() - started, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "test_acc": round(result.test_results["metrics"]["acc"], 4),
    }
    print(json.dumps(row), flush=True)
    return row


def run_ddp(out: Path) -> dict:
    from fer_bench.data import SynthFERConfig, generate_synthfer
    from tests.conftest import TINY_SYNTH, tiny_recipe_dict

    root = out / "tiny"
    generate_synthfer(out=root, config=SynthFERConfig(**TINY_SYNTH), workers=1)
    recipe = tiny_recipe_dict(root, out, **{"optim.epochs": 2, "optim.batch_size": 16})
    recipe["model"]["heads"] = {"au_heatmap": {}, "anchors": {"dim": 16, "warmup": 0.2}, "occlusion": {}}
    recipe["runtime"] |= {"device": "cuda", "precision": "fp32"}
    path = out / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "FER_BENCH_CACHE_DIR": str(out / "cache"), "OMP_NUM_THREADS": "1"}
    train = ["-m", "fer_bench", "train", str(path)]

    def summary(folder: Path) -> list[dict]:
        with open(folder / "summary.csv") as f:
            return list(csv.DictReader(f))

    report: dict = {}
    one = subprocess.run([sys.executable, *train, "--set", f"output_dir={out / 'one'}"], env=env, cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    report["one_process_rc"] = one.returncode
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for backend in ("nccl", "gloo"):
        folder = out / f"two_{backend}"
        two = subprocess.run([*launch, *train, "--set", f"output_dir={folder}"], cwd=REPO, capture_output=True,
                             text=True, env={**env, "FER_BENCH_DIST_BACKEND": backend})  # fmt: skip
        report[f"{backend}_rc"] = two.returncode
        if two.returncode != 0:
            report[f"{backend}_error"] = (two.stderr or two.stdout)[-1500:]
            continue
        a, b = summary(out / "one"), summary(folder)
        report[f"{backend}_val_acc"] = [(ra["val_acc"], rb["val_acc"]) for ra, rb in zip(a, b, strict=True)]
        report[f"{backend}_val_loss"] = [(ra["val_loss"], rb["val_loss"]) for ra, rb in zip(a, b, strict=True)]
        report[f"{backend}_same_val_acc"] = all(ra["val_acc"] == rb["val_acc"] for ra, rb in zip(a, b, strict=True))
        break  # NCCL worked: gloo is only the fallback
    print(json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["recipe", "ddp"])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=None, help="write <what>.json here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = run_recipe(work, minutes=args.minutes, n_train=args.n_train) if args.what == "recipe" else None
        report = report or run_ddp(work)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.what}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
