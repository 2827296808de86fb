"""GPU check of the real-dataset recipes: full ViT-B/16 and Swin-T at 224 px, bf16 autocast, on fixture trees
written in RAF-DB's and AffectNet's own formats (tests/formats.py), plus a bf16-vs-fp32 training throughput figure.

Prints, per recipe: steps, images/s, peak GPU memory, the autocast dtype used, the final loss and the test report;
then ViT-B/16 training images/s at batch 128 in fp32 (the plain baseline) and bf16, with their ratio.

    python benchmarks/gpu_check.py [--epochs 2] [--out DIR]      (benchmarks/gpu_check.sh sets up the device machine)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fer_bench.models import create_model
from fer_bench.train import fit, load_recipe
from fer_bench.train.fit import autocast_dtype
from tests import formats


def run_recipe(name: str, root: Path, work: Path, *, epochs: int, extra: list[str]) -> dict:
    torch.cuda.reset_peak_memory_stats()
    recipe = load_recipe(
        Path("recipes") / f"{name}.yaml",
        [
            f"data.root={root}",
            "model.pretrained=false",  # no network on the device machine; the architecture is the recipe's own
            f"optim.epochs={epochs}",
            "tracking.enabled=false",
            f"output_dir={work / name}",
            *extra,
        ],
    )
    t0 = time.time()
    result = fit(recipe)
    seconds = time.time() - t0
    train_seconds = sum(r["seconds"] for r in result.summary)
    state = torch.load(work / name / "last.pt", map_location="cpu", weights_only=True)
    steps = int(state["scheduler"]["last_epoch"])
    images = steps * recipe.optim.batch_size
    return {
        "recipe": name,
        "device": torch.cuda.get_device_name(),
        "autocast": str(autocast_dtype(recipe.runtime.precision, torch.device("cuda"))),
        "steps": steps,
        "train_images_per_s_incl_val": round(images / train_seconds, 1),
        "wall_s": round(seconds, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_train_loss": round(result.summary[-1]["train_loss"], 4),
        "val_acc": [round(r["val_acc"], 4) for r in result.summary],
        "test_n": result.test_results["n"],
        "test_acc": round(result.test_results["metrics"]["acc"], 4),
        "protocol": result.test_results["protocol"],
    }


def throughput(backbone: str, *, dtype: torch.dtype | None, batch: int = 128, steps: int = 20) -> float:
    """Training images/s of ``backbone`` at 224 px on random tensors (no loader), after 5 warm-up steps."""
    model = create_model(backbone, num_classes=7, img_size=224).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 7, (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.time()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x)["logits"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return batch * steps / (time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.json here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    report: dict = {"recipes": [], "throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raf = formats.write_rafdb_official(work / "raf", per_code_train=40, per_code_test=10)
        aff = formats.write_affectnet_csv(work / "aff", per_code=30)
        for name, root, extra in (
            ("rafdb_vit_b16", raf, []),
            ("rafdb_swin_t", raf, []),
            ("affectnet8_vit_b16", aff, ["optim.batch_size=64"]),
        ):
            row = run_recipe(name, root, work, epochs=args.epochs, extra=extra)
            report["recipes"].append(row)
            print(json.dumps(row), flush=True)
    for backbone in ("vit_base_patch16_224", "swin_tiny_patch4_window7_224"):
        fp32 = throughput(backbone, dtype=None)
        bf16 = throughput(backbone, dtype=torch.bfloat16)
        report["throughput"][backbone] = {
            "fp32_img_s": round(fp32, 1),
            "bf16_img_s": round(bf16, 1),
            "bf16_over_fp32": round(bf16 / fp32, 2),
        }
        print(
            f"{backbone} train img/s at batch 128, 224 px: fp32 {fp32:.0f} (baseline), bf16 {bf16:.0f} "
            f"(x{bf16 / fp32:.2f})",
            flush=True,
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
