"""The training data of a run: read the dataset, put it through the prepared cache, choose the loader, and build the
training and validation loaders for this process.

Two loaders serve the same batches (the same dict, the same order of samples from
:func:`fer_bench.data.sampling.epoch_order`):

* ``device`` (:class:`~fer_bench.data.device_loader.DeviceLoader`): the cache on the device, augmentation in torch;
  the default whenever a cache is used;
* ``albumentations`` (:class:`AlbumentationsLoader`): the per-sample CPU pipeline in DataLoader workers, for data
  without a cache and for custom pipelines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

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
from fer_bench.data.au_maps import MAP_SOURCES, expression_aus
from fer_bench.data.cache import cached_dataset, describe_alignment, open_cache, read_cache_card
from fer_bench.data.device_loader import DeviceLoader
from fer_bench.data.occluders import check_occluder_kinds
from fer_bench.data.prepare import aligned_dataset
from fer_bench.data.sampling import epoch_order, local_batch_size, rank_batch, steps_per_epoch
from fer_bench.errors import ConfigError
from fer_bench.faces import create_detector
from fer_bench.models import FerModel
from fer_bench.runtime import DistContext

LOADERS: tuple[str, ...] = ("auto", "device", "albumentations")


def load_dataset(
    *,
    dataset: str,
    root: str | Path,
    options: dict[str, Any],
    synth: dict[str, Any] | None,
    message: Callable[[str], None],
) -> DatasetInfo:
    """Read ``dataset`` at ``root``; a missing SynthFER root is generated first with the ``synth`` parameters."""
    root = Path(root)
    if dataset == "synthfer" and not root.exists():
        try:
            config = SynthFERConfig(**dict(synth or {}))
        except TypeError as exc:
            raise ConfigError(f"data.synth: {exc}") from None
        message(
            f"SynthFER not found at {root}: generating it ({config.n_train}/{config.n_val}/"
            f"{config.n_test} images at {config.size} px, seed {config.seed})"
        )
        started = time.time()
        generate_synthfer(out=root, config=config)
        message(f"SynthFER generated in {time.time() - started:.0f} s")
    return get_dataset(dataset, root, **options)


def dataset_for_run(
    *,
    dataset: str,
    root: str | Path,
    options: dict[str, Any],
    synth: dict[str, Any] | None,
    cache: str,
    cache_size: int | None,
    img_size: int,
    val_split: str,
    val_fraction: float,
    seed: int,
    label_space: str | None,
    message: Callable[[str], None],
    progress: Callable[[int, int], None] | None = None,
    align: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> DatasetInfo:
    """The run's dataset: read (or generated), through the prepared cache unless ``cache`` is ``off``, with a
    validation split carved from train when the dataset ships none, checked against the recipe's label space.

    A cache folder can stand in for the dataset: when ``root`` does not exist but ``cache`` names a cache of this
    dataset, training reads the cache as built (e.g. only the cache was copied to a GPU machine). A cache folder made
    by ``ferbench data prepare`` is trained on as prepared (its alignment is adopted; a different ``align`` template
    is an error). With ``align`` (the recipe's ``data.align``) the faces are detected and aligned into a cache.
    """
    cache_folder = Path(cache) if cache not in ("auto", "off") else None
    prepared = None
    if cache_folder is not None and (cache_folder / "cache.yaml").is_file():
        prepared = read_cache_card(cache_folder).get("alignment")
    if prepared and align and align["template"] != prepared.get("template"):
        raise ConfigError(
            f"data.align.template {align['template']!r}: the cache {cache_folder} holds faces aligned to "
            f"{prepared.get('template')!r}; prepare a cache with --align {align['template']} or drop data.align"
        )
    if align and cache == "off":
        raise ConfigError("data.align: aligned faces live in the prepared cache; set data.cache to auto or a folder")
    if cache_folder is not None and (prepared or not Path(root).exists()) and (cache_folder / "cache.yaml").is_file():
        info = open_cache(cache_folder)
        if info.name != dataset:
            raise ConfigError(f"data.cache {cache_folder}: holds dataset {info.name!r}, the recipe trains {dataset!r}")
        if prepared:
            message(f"data.cache {cache_folder}: faces{describe_alignment(prepared, prefix=' ')}, as prepared")
        else:
            message(f"data.root {root} not found: training from the prepared cache {cache_folder} as it was built")
    else:
        info = load_dataset(dataset=dataset, root=root, options=options, synth=synth, message=message)
        if align:
            info = aligned_dataset(
                info,
                template=align["template"],
                size=cache_size or img_size,
                landmarks=align["landmarks"],
                detector=(
                    create_detector(align["detector"], weights=align.get("detector_weights"), device=device, lazy=True)
                    if align["landmarks"] == "detector"
                    else None
                ),
                select=align["select"],
                out=None if cache == "auto" else cache,
                options=options,
                progress=(lambda _stage, done, total: progress(done, total)) if progress else None,
                message=message,
            )
        elif cache != "off":
            info = cached_dataset(
                info,
                cache=cache,
                size=cache_size,
                default_size=img_size,  # a cache folder given by path keeps the size it was built at
                options=options,
                progress=progress,
                message=message,
            )
    if not (info.manifest["split"] == val_split).any() and val_split == "val":
        info = with_validation_split(info, fraction=val_fraction, seed=seed)
        message(f"{info.name} has no val split: validating on {val_fraction:.0%} of train")
    if label_space and label_space != info.label_space.name:
        raise ConfigError(
            f"data.label_space: {label_space!r} differs from the dataset's {info.label_space.name!r}; "
            "leave it unset to use the dataset's"
        )
    return info


def resolve_loader(loader: str, *, cached: bool) -> str:
    """``auto`` → ``device`` with a cache, ``albumentations`` without; ``device`` without a cache is an error."""
    if loader not in LOADERS:
        raise ConfigError(f"data.loader: expected one of {list(LOADERS)}, got {loader!r}")
    if loader == "auto":
        return "device" if cached else "albumentations"
    if loader == "device" and not cached:
        raise ConfigError("data.loader=device needs the prepared cache; set data.cache to auto or a cache folder")
    return loader


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


class AlbumentationsLoader:
    """The CPU loader: :class:`FaceDataset` (decode, albumentations) in DataLoader workers, batched in the shared
    order of :func:`epoch_order` (rank r takes its strided slice), so it serves the device loader's batches."""

    kind = "albumentations"
    residency = "none"

    def __init__(
        self,
        dataset: FaceDataset,
        *,
        global_batch: int,
        seed: int,
        sampler: str,
        ctx: DistContext,
        workers: int,
        device: torch.device,
    ) -> None:
        self.dataset, self.global_batch, self.seed, self.sampler = dataset, global_batch, seed, sampler
        self.ctx, self.workers, self.device = ctx, workers, device
        self.epoch = 0
        local_batch_size(global_batch, ctx.world_size)  # checks divisibility

    def __len__(self) -> int:
        return steps_per_epoch(len(self.dataset), self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = epoch_order(
            len(self.dataset), seed=self.seed, epoch=self.epoch, sampler=self.sampler, labels=self.dataset.labels
        )
        batches = [
            rank_batch(
                order, step=step, global_batch=self.global_batch, rank=self.ctx.rank, world_size=self.ctx.world_size
            ).tolist()
            for step in range(start_step, len(self))
        ]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        yield from _on_device(loader, self.device)


def _on_device(loader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """A DataLoader's batches, moved to ``device`` (from pinned memory on a GPU: non-blocking)."""
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class RunData:
    """Everything the loop needs from the data side."""

    info: DatasetInfo
    train: Any  # DeviceLoader | AlbumentationsLoader: __len__, set_epoch(epoch), iterate(start_step)
    val: Any  # an iterable of batches (this rank's share of the validation split)
    loader: str
    residency: str
    train_labels: np.ndarray
    map_sources: dict[str, int]


def build_loaders(
    info: DatasetInfo,
    model: FerModel,
    *,
    loader: str,
    residency: str,
    train_split: str,
    val_split: str,
    img_size: int,
    global_batch: int,
    augment: AugmentOptions,
    sampler: str,
    seed: int,
    workers: int,
    cache_images: bool,
    ctx: DistContext,
    device: torch.device,
) -> RunData:
    """The training and validation loaders of this process for ``loader`` (``device`` or ``albumentations``)."""
    heads = head_data_options(model, info, augment)
    val_batch = max(global_batch // ctx.world_size, 128)
    if loader == "device":
        common = dict(device=device, img_size=img_size, rank=ctx.rank, world_size=ctx.world_size, residency=residency)
        train = DeviceLoader(
            info,
            train_split,
            batch_size=global_batch,
            train=True,
            augment=augment,
            seed=seed,
            sampler=sampler,
            **common,
            **heads,
        )
        val = DeviceLoader(info, val_split, batch_size=val_batch, train=False, **common)
        return RunData(info, train, val, "device", train.residency, train.labels_np, _device_map_sources(train))
    dataset = FaceDataset.from_info(
        info,
        train_split,
        transform=create_transform(
            train=True, img_size=img_size, augment=augment, with_clean="occlusion_augment" in heads
        ),
        train=True,
        hflip=augment.hflip,
        seed=seed,
        cache_images=cache_images,
        **heads,
    )
    train = AlbumentationsLoader(
        dataset, global_batch=global_batch, seed=seed, sampler=sampler, ctx=ctx, workers=workers, device=device
    )
    val_set = FaceDataset.from_info(
        info, val_split, transform=create_transform(train=False, img_size=img_size), cache_images=cache_images
    )
    share = Subset(val_set, list(range(ctx.rank, len(val_set), ctx.world_size)))
    val_loader = DataLoader(share, batch_size=val_batch, shuffle=False, num_workers=workers)
    val = _OnDevice(val_loader, device)
    sources = _dataset_map_sources(dataset) if "heatmaps" in heads else {}
    return RunData(info, train, val, "albumentations", "none", dataset.labels, sources)


class _OnDevice:
    """An iterable (once per epoch) of a DataLoader's batches on ``device``."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _on_device(self.loader, self.device)


def _dataset_map_sources(dataset: FaceDataset, sample: int = 200) -> dict[str, int]:
    n = min(sample, len(dataset))
    codes = [int(dataset[i]["heatmap_source"]) for i in range(n)]
    return {MAP_SOURCES[c]: codes.count(c) for c in sorted(set(codes))}


def _device_map_sources(loader: DeviceLoader, sample: int = 200) -> dict[str, int]:
    if loader.heatmaps is None:
        return {}
    names = loader.info.label_space.names
    n = min(sample, len(loader.rows))
    has_aus = [bool(expression_aus(names[int(label)])) for label in loader.labels_np[:n]]
    codes = [int(c) if a else 0 for c, a in zip(loader.map_sources[:n].tolist(), has_aus, strict=True)]
    return {MAP_SOURCES[c]: codes.count(c) for c in sorted(set(codes))}


def describe_heads(model: FerModel, map_sources: dict[str, int]) -> str:
    """One line on the heads and their data (the AU-map sources counted on the first 200 training items)."""
    parts = []
    for name, head in model.heads.items():
        settings = ", ".join(f"{k}={v}" for k, v in head.config().items())
        if name == "au_heatmap":
            settings += f"; AU-map sources in {sum(map_sources.values())} training samples: {map_sources}"
        parts.append(f"{name} ({settings})")
    return "; ".join(parts)
