"""Training throughput: model-only and end-to-end images/s, MFU and peak memory, as timm-style CSV rows.

GPU (``--device cuda``, the default when CUDA is there): ViT-S/16, ViT-B/16, Swin-T and Swin-B at 224 px, bf16
autocast with fp32 master weights, fused AdamW, global batch 256, each without heads and with all three.

* model-only: the training step (fer_bench's own ``train_steps``) on one fixed random batch already on the GPU;
* end to end: the same step fed by the device loader from a random uint8 cache (256 px, 8,192 images) held in HBM,
  with the full augmentation (warp, colour, and the heads' AU maps and occluders);
* timing as gpu.md §5: warm-up steps excluded (compile time reported apart), CUDA events after every step, the median
  over ``--steps`` (>= 30) steps, random (never zero) data;
* MFU = img/s x training FLOPs per image / peak, against the measured 790 and the datasheet 989 TFLOP/s; training
  FLOPs = 3 x the forward FLOPs counted by ``torch.utils.flop_counter`` on the model as configured (heads included).

CPU (``--device cpu``): the quickstart recipe, one epoch at a time, alternating in this process between the plain
baseline (the albumentations loader decoding the PNGs, fused SDPA attention, foreach AdamW, the loss read every step)
and the shipped path (the prepared cache, the device loader, plain attention on the CPU, fused AdamW, the loss read
every 25 steps); it prints each epoch's seconds, the loader's share and the step time, and the ratio.

    python benchmarks/train_throughput.py [--device cuda|cpu] [--models vit_b16 swin_t ...] [--steps 30]
        [--batch 256] [--compile vit_b16 ...] [--out benchmarks/results/throughput.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fer_bench._io import atomic_write_text  # noqa: E402
from fer_bench.data import AugmentOptions  # noqa: E402
from fer_bench.data.au_maps import template_landmarks  # noqa: E402
from fer_bench.data.cache import CACHE_FORMAT_VERSION, open_cache  # noqa: E402
from fer_bench.data.device_loader import DeviceLoader  # noqa: E402
from fer_bench.models import create_model, set_fused_attention  # noqa: E402
from fer_bench.runtime import DistContext, autocast_dtype  # noqa: E402
from fer_bench.train.data_setup import head_data_options  # noqa: E402
from fer_bench.train.fit import build_optimizer  # noqa: E402
from fer_bench.train.loop import EpochTally, train_steps  # noqa: E402

MODELS = {
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}
ALL_HEADS = {"au_heatmap": {}, "anchors": {"dim": 256, "warmup": 0.0}, "occlusion": {}}
PEAK_MEASURED, PEAK_DATASHEET = 790e12, 989e12
COLUMNS = [
    "date",
    "device_name",
    "model",
    "img_size",
    "batch",
    "precision",
    "compile",
    "heads",
    "loader",
    "devices",
    "model_only_img_s",
    "end_to_end_img_s",
    "e2e_over_model_only",
    "train_gflop_per_img",
    "mfu_790",
    "mfu_989",
    "peak_mem_gib",
    "step_ms_model_only",
    "step_ms_end_to_end",
    "compile_s",
    "host_syncs_per_step",
    "torch",
]


# ---------------------------------------------------------------------------------------------------------------------
# A random cache (the device loader's input) and a fixed-batch loader (the model-only figure)


def random_cache(folder: Path, *, n: int, size: int, num_classes: int = 8, seed: int = 0) -> Path:
    """A prepared cache of ``n`` random uint8 images (never zeros) with template landmarks, in the cache format."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(folder / "train.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    for start in range(0, n, 1024):
        array[start : start + 1024] = rng.integers(1, 255, (min(1024, n - start), size, size, 3), dtype=np.uint8)
    array.flush()
    landmarks = template_landmarks(size).reshape(-1).round(3).tolist()
    rows = pd.DataFrame(
        {
            "image_id": [f"r{i:06d}" for i in range(n)],
            "split": "train",
            "label": rng.integers(0, num_classes, n),
            "array_index": np.arange(n),
            "landmarks": [landmarks] * n,
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    card = {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": "synthfer",
        "layout": "random throughput cache",
        "source_hash": "random",
        "parameters": {"format_version": CACHE_FORMAT_VERSION, "size": size},
        "counts": {"train": n},
        "label_space": "all8",
    }
    atomic_write_text(folder / "cache.yaml", yaml.safe_dump(card, sort_keys=False))
    return folder


class _Fixed:
    """Yields one batch ``steps`` times: the model-only measurement through the same step function."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def iterate(self, start_step: int = 0):
        for _ in range(start_step, self.steps):
            yield self.batch


def _train_flops_per_image(model, batch: dict, amp_dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    images = batch["image"][:2]
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        model(images, occlusion_mask=batch.get("occlusion")[:2] if "occlusion" in batch else None)
    return 3 * counter.get_total_flops() / len(images)


def _timed_steps(model, loader, *, device, amp_dtype, optimizer, scheduler, steps: int, warmup: int) -> list[float]:
    """Per-step milliseconds (CUDA events) of steps warmup..warmup+steps of ``train_steps`` over ``loader``."""
    events: list = []

    def step_done(_loss):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
        else:
            events.append(time.perf_counter())

    train_steps(
        model,
        loader,
        start_step=0,
        tally=EpochTally(device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        device=device,
        amp_dtype=amp_dtype,
        label_smoothing=0.1,
        grad_clip=None,
        target_kind="label",
        class_weights=None,
        seed=0,
        rank=0,
        total_steps=10**6,
        max_steps=None,
        log_every=10**9,
        step_done=step_done,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = [events[i].elapsed_time(events[i + 1]) for i in range(warmup - 1, len(events) - 1)]
    else:
        times = [1000 * (events[i + 1] - events[i]) for i in range(warmup - 1, len(events) - 1)]
    return times[:steps]


def measure(
    key: str,
    *,
    heads: bool,
    cache: Path,
    device: torch.device,
    img_size: int,
    batch: int,
    compile_model: bool,
    steps: int,
    warmup: int,
) -> dict:
    name = MODELS[key]
    amp_dtype = autocast_dtype("bf16", device)
    torch.manual_seed(0)
    model = create_model(name, num_classes=8, img_size=img_size, heads=ALL_HEADS if heads else {})
    set_fused_attention(model, device.type == "cuda")
    model = model.to(device)
    info = open_cache(cache)
    data_options = head_data_options(model, info, AugmentOptions())
    loader = DeviceLoader(info, "train", device=device, img_size=img_size, batch_size=batch, seed=0, **data_options)
    loader.set_epoch(0)
    fixed = {k: v.clone() for k, v in next(loader.iterate(0)).items()}
    flops = _train_flops_per_image(model, fixed, amp_dtype)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, layer_decay=None, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    compile_s = None
    if compile_model:
        model.compile()
        started = time.perf_counter()
        _timed_steps(model, _Fixed(fixed, 3), device=device, amp_dtype=amp_dtype, optimizer=optimizer,
                     scheduler=scheduler, steps=1, warmup=1)  # fmt: skip
        compile_s = round(time.perf_counter() - started, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = warmup + steps + 1
    model_only = _timed_steps(model, _Fixed(fixed, total), device=device, amp_dtype=amp_dtype, optimizer=optimizer,
                              scheduler=scheduler, steps=steps, warmup=warmup)  # fmt: skip
    if len(loader) < total:
        raise SystemExit(f"the cache holds {len(loader)} steps of {batch}; {total} are needed")
    end_to_end = _timed_steps(model, loader, device=device, amp_dtype=amp_dtype, optimizer=optimizer,
                              scheduler=scheduler, steps=steps, warmup=warmup)  # fmt: skip
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    syncs = None
    if device.type == "cuda":  # count the host synchronisations of 5 steps (torch's sync debug mode warns on each)
        import warnings

        loader.set_epoch(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _timed_steps(model, _Fixed(fixed, 6), device=device, amp_dtype=amp_dtype, optimizer=optimizer,
                             scheduler=scheduler, steps=5, warmup=1)  # fmt: skip
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = round(sum("synchroniz" in str(w.message) for w in caught) / 6, 2)
    ms_model, ms_e2e = statistics.median(model_only), statistics.median(end_to_end)
    ips_model, ips_e2e = batch / ms_model * 1000, batch / ms_e2e * 1000
    return {
        "date": _dt.date.today().isoformat(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": name,
        "img_size": img_size,
        "batch": batch,
        "precision": str(amp_dtype or "fp32").replace("torch.", ""),
        "compile": compile_model,
        "heads": "au_heatmap+anchors+occlusion" if heads else "none",
        "loader": f"device ({loader.residency})",
        "devices": 1,
        "model_only_img_s": round(ips_model, 1),
        "end_to_end_img_s": round(ips_e2e, 1),
        "e2e_over_model_only": round(ips_e2e / ips_model, 3),
        "train_gflop_per_img": round(flops / 1e9, 2),
        "mfu_790": round(ips_e2e * flops / PEAK_MEASURED, 4),
        "mfu_989": round(ips_e2e * flops / PEAK_DATASHEET, 4),
        "peak_mem_gib": round(peak, 2),
        "step_ms_model_only": round(ms_model, 2),
        "step_ms_end_to_end": round(ms_e2e, 2),
        "compile_s": compile_s,
        "host_syncs_per_step": syncs,
        "torch": torch.__version__,
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (replacing rows of the same device, model, heads and compile)."""
    old = []
    if path.is_file():
        with open(path) as f:
            old = list(csv.DictReader(f))
    key = lambda r: (r["device_name"], r["model"], str(r["heads"]), str(r["compile"]), str(r["batch"]))  # noqa: E731
    fresh = {key({k: str(v) for k, v in r.items()}) for r in rows}
    kept = [r for r in old if key(r) not in fresh]
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(kept + rows)
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the quickstart epoch, baseline against shipped, alternating in one process


def cpu_quickstart(*, epochs: int, root: Path) -> tuple[list[dict], dict]:
    from torch.utils.data import DataLoader

    from fer_bench.data import FaceDataset, create_transform, get_dataset
    from fer_bench.data.cache import cached_dataset
    from fer_bench.train import load_recipe
    from fer_bench.train.data_setup import AlbumentationsLoader
    from fer_bench.train.loop import validate

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    data, optim = recipe.data, recipe.optim
    device = torch.device("cpu")
    amp_dtype = autocast_dtype(recipe.runtime.precision, device)
    augment = data.augment
    raw = get_dataset("synthfer", root)
    cached = cached_dataset(raw, cache="auto", size=data.img_size, message=print)

    def build(kind: str):
        torch.manual_seed(0)
        model = create_model(
            recipe.model.backbone,
            num_classes=8,
            img_size=data.img_size,
            stem=recipe.model.stem,
            **recipe.model.backbone_kwargs,
        ).to(memory_format=torch.channels_last)
        if kind == "baseline":  # what the quickstart ran before the cache: PNGs, albumentations, fused SDPA
            set_fused_attention(model, True)
            dataset = FaceDataset.from_info(
                raw,
                "train",
                transform=create_transform(train=True, img_size=data.img_size, augment=augment),
                train=True,
                hflip=augment.hflip,
                cache_images=True,
            )
            train = AlbumentationsLoader(
                dataset, global_batch=optim.batch_size, seed=0, sampler="random", ctx=DistContext(), workers=0,
                device=device,
            )  # fmt: skip
            val_set = FaceDataset.from_info(raw, "val", transform=create_transform(train=False, img_size=data.img_size))
            val = [{"image": b["image"], "label": b["label"]} for b in DataLoader(val_set, batch_size=128)]
            val_loader = val  # decoded once, like the cached images of the old loader
            log_every, fused = 1, False
        else:
            set_fused_attention(model, False)
            train = DeviceLoader(cached, "train", device=device, img_size=data.img_size,
                                 batch_size=optim.batch_size, augment=augment, seed=0)  # fmt: skip
            val_loader = DeviceLoader(cached, "val", device=device, img_size=data.img_size, batch_size=128,
                                      train=False)  # fmt: skip
            log_every, fused = 25, True
        optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, layer_decay=None, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, train, val_loader, optimizer, scheduler, log_every

    runs = {kind: build(kind) for kind in ("baseline", "shipped")}
    rows = []
    for epoch in range(epochs):
        for kind, (model, train, val_loader, optimizer, scheduler, log_every) in runs.items():
            train.set_epoch(epoch)
            started = time.perf_counter()
            n = 0
            for _ in train.iterate(0):  # the loader alone
                n += 1
            loader_s = time.perf_counter() - started
            train.set_epoch(epoch)
            started = time.perf_counter()
            train_steps(model, train, start_step=0, tally=EpochTally(device), optimizer=optimizer,
                        scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False), device=device,
                        amp_dtype=amp_dtype, label_smoothing=optim.label_smoothing, grad_clip=None,
                        target_kind="label", class_weights=None, seed=0, rank=0, total_steps=10**6, max_steps=None,
                        log_every=log_every, step_done=lambda loss: None,
                        memory_format=torch.channels_last)  # fmt: skip
            train_s = time.perf_counter() - started
            started = time.perf_counter()
            validate(model, val_loader, device=device, amp_dtype=amp_dtype, num_classes=8,
                     memory_format=torch.channels_last)  # fmt: skip
            val_s = time.perf_counter() - started
            row = {
                "epoch": epoch,
                "path": kind,
                "epoch_s": round(train_s + val_s, 2),
                "train_s": round(train_s, 2),
                "val_s": round(val_s, 2),
                "loader_alone_s": round(loader_s, 2),
                "loader_share": round(loader_s / (train_s + val_s), 3),
                "step_ms": round(1000 * train_s / n, 1),
            }
            rows.append(row)
            print(row, flush=True)
    facts = {"img_size": data.img_size, "batch_size": optim.batch_size, "train_images": len(cached.split("train"))}
    return rows, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--heads", nargs="+", default=["none", "all"], choices=["none", "all"])
    parser.add_argument("--compile", nargs="*", default=[], choices=list(MODELS), help="also measure compiled")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--cache-images", type=int, default=12288)
    parser.add_argument("--epochs", type=int, default=3, help="CPU: quickstart epochs per path")
    parser.add_argument("--synthfer", type=Path, default=REPO / "data" / "synthfer", help="CPU: SynthFER root")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput.csv")
    args = parser.parse_args()
    if args.steps < 30:
        parser.error("--steps: the median needs at least 30 timed steps")
    device = torch.device(args.device)
    if device.type == "cpu":
        if not args.synthfer.is_dir():
            from fer_bench.data import generate_synthfer

            generate_synthfer(out=args.synthfer)
        rows, recipe_data = cpu_quickstart(epochs=args.epochs, root=args.synthfer)
        steady = [r for r in rows if r["epoch"] > 0] or rows
        med = {k: statistics.median(r["epoch_s"] for r in steady if r["path"] == k) for k in ("baseline", "shipped")}
        print(
            f"quickstart epoch, median of epochs 2..{args.epochs}: baseline {med['baseline']:.2f} s, shipped "
            f"{med['shipped']:.2f} s: x{med['baseline'] / med['shipped']:.2f}; first epoch (PNG decode): baseline "
            f"{rows[0]['epoch_s']:.2f} s, shipped {rows[1]['epoch_s']:.2f} s"
        )
        cpu_rows = [
            {
                "date": _dt.date.today().isoformat(),
                "device_name": f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})",
                "model": "quickstart (vit_tiny conv stem, depth 2)",
                "img_size": recipe_data["img_size"],
                "batch": recipe_data["batch_size"],
                "precision": str(autocast_dtype("bf16", device) or "fp32").replace("torch.", ""),
                "compile": False,
                "heads": "none",
                "loader": f"{kind}: {'albumentations (decode)' if kind == 'baseline' else 'device (cache in RAM)'}",
                "devices": 1,
                "end_to_end_img_s": round(
                    recipe_data["train_images"] / statistics.median(r["train_s"] for r in steady if r["path"] == kind),
                    1,
                ),
                "step_ms_end_to_end": statistics.median(r["step_ms"] for r in steady if r["path"] == kind),
                "torch": torch.__version__,
            }
            for kind in ("baseline", "shipped")
        ]
        write_rows(args.out, cpu_rows)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = random_cache(Path(tmp) / "cache", n=args.cache_images, size=256)
        for key in args.models:
            for heads in args.heads:
                for compiled in (False, True) if key in args.compile else (False,):
                    row = measure(key, heads=heads == "all", cache=cache, device=device, img_size=args.img_size,
                                  batch=args.batch, compile_model=compiled, steps=args.steps,
                                  warmup=args.warmup)  # fmt: skip
                    rows.append(row)
                    write_rows(args.out, [row])
                    print(
                        f"{row['model']:32s} heads={row['heads']:28s} compile={compiled!s:5s} model-only "
                        f"{row['model_only_img_s']:8.1f} img/s  end-to-end {row['end_to_end_img_s']:8.1f} img/s "
                        f"({row['e2e_over_model_only']:.1%})  MFU {row['mfu_790']:.1%} of 790  "
                        f"peak {row['peak_mem_gib']} GiB",
                        flush=True,
                    )
                    torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
