"""``fit``: the one place a recipe is unpacked into data, model, optimiser, schedule, loop, checkpoints and tracking."""

from __future__ import annotations

import csv
import io
import logging
import math
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from fer_bench import __version__
from fer_bench._io import atomic_write_text
from fer_bench.data import (
    AugmentOptions,
    DatasetInfo,
    FaceDataset,
    SynthFERConfig,
    create_transform,
    generate_synthfer,
    get_dataset,
    with_validation_split,
)
from fer_bench.data.au_maps import MAP_SOURCES
from fer_bench.data.occluders import check_occluder_kinds
from fer_bench.errors import ConfigError
from fer_bench.eval import evaluate, flat_metrics, write_report
from fer_bench.models import FerModel, create_model
from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fer_bench.provenance import git_sha
from fer_bench.train.losses import classification_loss
from fer_bench.train.recipe import Recipe, recipe_from_dict
from fer_bench.train.tracking import Tracker, resume_tracker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    output_dir: Path
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    test_results: dict[str, Any] | None = None
    run_id: str | None = None
    summary: list[dict[str, float]] = field(default_factory=list)


class Callbacks:
    """Hooks the CLI uses for progress bars and messages; the defaults log."""

    def message(self, text: str) -> None:
        log.info(text)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float) -> None:
        pass

    def end_epoch(self, row: dict[str, float]) -> None:
        log.info("epoch %s: %s", row["epoch"], row)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for fp32 (fp16 needs CUDA)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.bfloat16
    if precision == "bf16" and device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return torch.bfloat16  # without AVX-512 (BF16/AMX) bf16 on a CPU is emulated and slower than fp32
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    Example:
        >>> warmup_cosine(0, warmup_steps=10, total_steps=100, min_ratio=0.0)
        0.1
        >>> round(warmup_cosine(100, warmup_steps=10, total_steps=100, min_ratio=0.0), 6)
        0.0
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def class_balanced_sampler(labels: np.ndarray, *, generator: torch.Generator) -> torch.utils.data.Sampler:
    """Draw ``len(labels)`` indices with replacement, each class equally likely (AffectNet's usual fix for its
    imbalanced training set); the order depends only on ``generator``'s seed."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels), replacement=True, generator=generator
    )


def build_optimizer(model: FerModel, *, lr: float, weight_decay: float, layer_decay: float | None):
    """AdamW via timm (no decay on norms/biases/position embeddings; optional layer-wise lr decay)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def environment_facts(device: torch.device) -> dict[str, str]:
    import albumentations
    import timm

    return {
        "fer_bench": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "timm": timm.__version__,
        "albumentations": albumentations.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
        "git_sha": git_sha(),
    }


def load_data(recipe: Recipe, callbacks: Callbacks) -> DatasetInfo:
    """Read the recipe's dataset; a missing SynthFER root is generated first with ``data.synth`` parameters."""
    root = Path(recipe.data.root)
    if recipe.data.dataset == "synthfer" and not root.exists():
        params = dict(recipe.data.synth or {})
        try:
            config = SynthFERConfig(**params)
        except TypeError as exc:
            raise ConfigError(f"data.synth: {exc}") from None
        callbacks.message(
            f"SynthFER not found at {root}: generating it ({config.n_train}/{config.n_val}/"
            f"{config.n_test} images at {config.size} px, seed {config.seed})"
        )
        t0 = time.time()
        generate_synthfer(out=root, config=config)
        callbacks.message(f"SynthFER generated in {time.time() - t0:.0f} s")
    info = get_dataset(recipe.data.dataset, root, **recipe.data.options)
    if not (info.manifest["split"] == recipe.data.val_split).any() and recipe.data.val_split == "val":
        info = with_validation_split(info, fraction=recipe.data.val_fraction, seed=recipe.runtime.seed)
        callbacks.message(f"{info.name} has no val split: validating on {recipe.data.val_fraction:.0%} of train")
    if recipe.data.label_space and recipe.data.label_space != info.label_space.name:
        raise ConfigError(
            f"data.label_space: {recipe.data.label_space!r} differs from the dataset's {info.label_space.name!r}; "
            "leave it unset to use the dataset's"
        )
    return info


def _summary_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def head_data_options(model: FerModel, info: DatasetInfo, augment: AugmentOptions) -> dict[str, Any]:
    """What the heads need from the training data: AU maps (``au_heatmap``), synthetic occluders with clean images
    and the dataset's own occlusion masks where it has them (``occlusion``, or ``augment.occluders`` alone)."""
    options: dict[str, Any] = {}
    if augment.occluders > 0:
        options["occlusion_augment"] = augment.occluders
        options["occlusion_masks"] = "masks" in info.extras
    au = model.head("au_heatmap")
    if au is not None:
        options["heatmaps"] = au.maps
    occlusion = model.head("occlusion")
    if occlusion is not None:
        options["occlusion_augment"] = occlusion.augment
        options["occluder_kinds"] = check_occluder_kinds(occlusion.occluders, option="model.heads.occlusion.occluders")
        options["occlusion_masks"] = "masks" in info.extras
    return options


def describe_heads(model: FerModel, train_set: FaceDataset, sample: int = 200) -> str:
    """One line on the heads and their data: AU-map sources counted on the first ``sample`` training items."""
    parts = []
    for name, head in model.heads.items():
        settings = ", ".join(f"{k}={v}" for k, v in head.config().items())
        if name == "au_heatmap":
            n = min(sample, len(train_set))
            codes = [int(train_set[i]["heatmap_source"]) for i in range(n)]
            counts = {MAP_SOURCES[c]: codes.count(c) for c in sorted(set(codes))}
            settings += f"; AU-map sources in {n} training samples: {counts}"
        parts.append(f"{name} ({settings})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train_one_epoch(
    model: FerModel,
    loader: DataLoader,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    label_smoothing: float,
    grad_clip: float | None,
    callbacks: Callbacks,
    target_kind: str = "label",
    max_steps: int | None = None,
    total_steps: int | None = None,
    class_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (or fewer batches once ``max_steps`` optimiser steps were taken in all).

    The loss is the classification loss plus every head's named terms (:meth:`FerModel.losses`); each term's epoch
    mean is returned as ``loss_<name>`` next to ``train_loss`` (their sum) and ``train_acc``.
    """
    model.train()
    total, count, correct = 0.0, 0, 0
    term_sums: dict[str, float] = {}
    needs_clean = model.head("occlusion") is not None
    for batch in loader:
        if max_steps is not None and scheduler.last_epoch >= max_steps:
            break
        model.set_progress(scheduler.last_epoch / max(1, total_steps or 1))
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)  # [B, 3, S, S]
        labels = batch["label"].to(device, non_blocking=True)  # [B]
        target = batch["target"].to(device, non_blocking=True) if "target" in batch else None  # [B, K] soft targets
        occlusion_mask = batch["occlusion"].to(device) if "occlusion" in batch else None  # [B, S, S]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            clean_outputs = None
            if needs_clean and "clean_image" in batch:
                with torch.no_grad():  # the teacher of the consistency term
                    clean = batch["clean_image"].to(device, memory_format=memory_format)
                    clean_outputs = model(clean, reconstruct=False)
            outputs = model(images, occlusion_mask=occlusion_mask)
            logits = outputs["logits"]  # [B, K]
            terms = {
                "ce": classification_loss(
                    outputs.get("train_logits", logits),
                    labels=labels,
                    target=target,
                    target_kind=target_kind,
                    label_smoothing=label_smoothing,
                    class_weights=class_weights,
                )
            }
            terms |= model.losses(outputs, batch, clean_outputs)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(images)
        total += loss.item() * n
        count += n
        correct += (logits.argmax(1) == labels).sum().item()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + float(value.detach()) * n
        callbacks.step(loss.item())
    row = {"train_loss": total / max(count, 1), "train_acc": correct / max(count, 1)}
    if len(term_sums) > 1:
        row |= {f"loss_{name}": value / max(count, 1) for name, value in term_sums.items()}
    return row


@torch.no_grad()
def validate(
    model: FerModel,
    loader: DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict:
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in loader:
        images = batch["image"].to(device, memory_format=memory_format)
        labels = batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)["logits"].float()
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return {"val_loss": total / max(count, 1), "val_acc": correct / max(count, 1)}


def fit(
    recipe: Recipe, *, resume: bool = False, callbacks: Callbacks | None = None, recipe_path: Path | None = None
) -> FitResult:
    """Train ``recipe``; write checkpoints, ``recipe.resolved.yaml`` and ``summary.csv`` into its output folder.

    Args:
        recipe: A validated recipe (``load_recipe``).
        resume: Continue from ``<output_dir>/last.pt``; the remaining epochs match an uninterrupted run on CPU.
        callbacks: Progress and message hooks.
        recipe_path: The recipe file, logged to MLflow next to the resolved recipe.
    """
    cb = callbacks or Callbacks()
    out = recipe.resolved_output_dir()
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if resume:
        state = load_checkpoint(last_path)
        saved = state["recipe"]
        if saved.get("optim", {}).get("epochs") != recipe.optim.epochs:
            cb.message(f"--resume: extending to {recipe.optim.epochs} epochs (was {saved['optim']['epochs']})")
        # The run continues with the data, model and optimiser it started with (the number of epochs may grow);
        # operational settings (device, workers, threads, time limit) come from the recipe given now.
        runtime = {**recipe.runtime.model_dump(mode="json"), "seed": saved["runtime"]["seed"]}
        recipe = recipe_from_dict(
            {**saved, "optim": {**saved["optim"], "epochs": recipe.optim.epochs}, "runtime": runtime}
        )
    elif last_path.exists():
        raise ConfigError(
            f"output_dir {out}: holds a checkpoint from an earlier run; pass --resume to continue it, or "
            f"--set output_dir=... to start a new one"
        )
    out.mkdir(parents=True, exist_ok=True)

    rt, data_cfg, optim_cfg = recipe.runtime, recipe.data, recipe.optim
    if rt.threads:
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)
    device = resolve_device(rt.device)
    amp_dtype = autocast_dtype(rt.precision, device)
    if rt.precision != "fp32" and amp_dtype is None:
        reason = "this CPU has no AVX-512, where bf16 is slower than fp32" if device.type == "cpu" else device.type
        cb.message(f"runtime.precision={rt.precision}: autocast not used ({reason}); training in fp32")

    info = load_data(recipe, cb)
    label_names = info.label_space.names
    backbone_kwargs = dict(recipe.model.backbone_kwargs)
    if recipe.model.drop_path_rate:
        backbone_kwargs["drop_path_rate"] = recipe.model.drop_path_rate
    model = create_model(
        recipe.model.backbone,
        num_classes=len(label_names),
        img_size=data_cfg.img_size,
        pretrained=recipe.model.pretrained,
        heads=recipe.model.heads,
        stem=recipe.model.stem,
        **backbone_kwargs,
    ).to(device)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model_config = {
        "backbone": recipe.model.backbone,
        "stem": recipe.model.stem,
        "num_classes": len(label_names),
        "img_size": data_cfg.img_size,
        "backbone_kwargs": {k: v for k, v in backbone_kwargs.items() if k != "drop_path_rate"},
        "heads": recipe.model.heads,
    }

    aug = AugmentOptions(**data_cfg.augment.model_dump())
    data_options = head_data_options(model, info, aug)
    train_set = FaceDataset.from_info(
        info,
        data_cfg.train_split,
        transform=create_transform(
            train=True, img_size=data_cfg.img_size, augment=aug, with_clean="occlusion_augment" in data_options
        ),
        train=True,
        hflip=aug.hflip,
        seed=rt.seed,
        cache_images=data_cfg.cache_images,
        **data_options,
    )
    val_set = FaceDataset.from_info(
        info,
        data_cfg.val_split,
        transform=create_transform(train=False, img_size=data_cfg.img_size),
        cache_images=data_cfg.cache_images,
    )
    if info.target_kind != "label":
        cb.message(f"{info.name}: training on soft targets ({info.target_kind}); {info.protocol}")
    workers = (0 if device.type == "cpu" else 8) if rt.workers == "auto" else rt.workers
    class_weights = None
    anchors = model.head("anchors")
    if anchors is not None and anchors.class_weighted:
        anchors.set_class_weights(torch.bincount(torch.as_tensor(train_set.labels), minlength=len(label_names)))
        class_weights = anchors.class_weights
    heads_text = describe_heads(model, train_set) if model.heads else ""
    if heads_text:
        cb.message(f"heads: {heads_text}")
    optimizer = build_optimizer(
        model, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, layer_decay=optim_cfg.layer_decay
    )
    steps_per_epoch = max(1, len(train_set) // optim_cfg.batch_size)
    total_steps = steps_per_epoch * optim_cfg.epochs
    warmup_steps = round(optim_cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=optim_cfg.min_lr_ratio
        ),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_acc, best_epoch, summary, run_id = 0, -1.0, -1, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        best_acc, best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        summary = list(state["summary"])
        run_id = state.get("mlflow_run_id")
        cb.message(f"resumed from {last_path} at epoch {start_epoch}")

    recipe_dict = recipe.model_dump(mode="json")
    recipe_dict["output_dir"] = str(out)  # the concrete folder, with {name}/{time} filled in
    env = environment_facts(device)
    resolved = {
        **recipe_dict,
        "_resolved": {**env, "label_space": list(label_names), "layout": info.layout, "protocol": info.protocol},
    }
    atomic_write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))

    trk = recipe.tracking
    if run_id:
        tracker = resume_tracker(tracking_uri=trk.tracking_uri, run_id=run_id, warn=cb.message)
    else:
        tracker = Tracker(
            enabled=trk.enabled,
            tracking_uri=trk.tracking_uri,
            experiment=trk.experiment,
            run_name=trk.run_name or recipe.name,
            warn=cb.message,
        )
        tracker.log_params(recipe_dict)
        tracker.set_tags(
            {
                "dataset": info.name,
                "layout": info.layout,
                "protocol": info.protocol,
                "backbone": recipe.model.backbone,
                "heads": heads_text or "none",
                **env,
            }
        )
        tracker.log_artifact(out / "recipe.resolved.yaml", "recipe")
        if recipe_path is not None:
            tracker.log_artifact(recipe_path, "recipe")
    run_id = tracker.run_id

    val_loader = DataLoader(val_set, batch_size=max(optim_cfg.batch_size, 128), shuffle=False, num_workers=workers)
    epochs_run = 0
    status = "FAILED"
    try:
        for epoch in range(start_epoch, optim_cfg.epochs):
            t0 = time.time()
            train_set.set_epoch(epoch)
            # The shuffle order is a function of (seed, epoch) alone, so --resume replays the same batches.
            order = torch.Generator().manual_seed(rt.seed * 1000 + epoch)
            sampler = (
                class_balanced_sampler(train_set.labels, generator=order) if data_cfg.sampler != "random" else None
            )
            train_loader = DataLoader(
                train_set,
                batch_size=optim_cfg.batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                drop_last=True,
                generator=order if sampler is None else None,
                num_workers=workers,
                persistent_workers=False,
            )
            cb.start_epoch(epoch, optim_cfg.epochs, len(train_loader))
            row: dict[str, float] = {"epoch": epoch}
            row |= train_one_epoch(
                model,
                train_loader,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                device=device,
                amp_dtype=amp_dtype,
                memory_format=memory_format,
                label_smoothing=optim_cfg.label_smoothing,
                grad_clip=optim_cfg.grad_clip,
                callbacks=cb,
                target_kind=info.target_kind,
                max_steps=rt.max_steps,
                total_steps=total_steps,
                class_weights=class_weights,
            )
            row |= validate(model, val_loader, device=device, amp_dtype=amp_dtype, memory_format=memory_format)
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.time() - t0, 2)
            summary.append(row)
            epochs_run += 1
            improved = row["val_acc"] > best_acc
            if improved:
                best_acc, best_epoch = row["val_acc"], epoch
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "epoch": epoch,
                "best_val_acc": best_acc,
                "best_epoch": best_epoch,
                "summary": summary,
                "recipe": recipe_dict,
                "model_config": model_config,
                "label_names": list(label_names),
                "dataset": info.name,
                "mlflow_run_id": run_id,
                "fer_bench_version": __version__,
            }
            save_checkpoint(last_path, ckpt)
            if improved:
                save_checkpoint(best_path, ckpt)
            atomic_write_text(out / "summary.csv", _summary_csv(summary))
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            cb.end_epoch(row)
            if rt.max_minutes and sum(r["seconds"] for r in summary) > rt.max_minutes * 60:
                cb.message(f"runtime.max_minutes={rt.max_minutes} reached after epoch {epoch}; stopping")
                break
            if rt.max_steps and scheduler.last_epoch >= rt.max_steps:
                cb.message(f"runtime.max_steps={rt.max_steps} reached in epoch {epoch}; stopping")
                break

        test_results = None
        if recipe.eval_after and best_path.exists():
            best_model = model_from_checkpoint(load_checkpoint(best_path)).to(device)
            test_results = evaluate(
                best_model,
                info,
                split=data_cfg.test_split,
                img_size=data_cfg.img_size,
                label_names=label_names,
                device=device,
                workers=workers,
            )
            test_results["checkpoint"] = str(best_path)
            paths = write_report(test_results, out / "eval")
            tracker.log_metrics(flat_metrics(test_results, prefix=data_cfg.test_split))
            for path in paths.values():
                tracker.log_artifact(path, "eval")
        tracker.log_artifact(out / "summary.csv")
        tracker.log_artifact(best_path, "checkpoints")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return FitResult(out, best_epoch, best_acc, epochs_run, test_results, run_id, summary)
