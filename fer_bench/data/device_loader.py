"""The device-resident loader: batches of a prepared cache, gathered by index and augmented in torch on the device.

When the cache fits (GPU HBM, or RAM on a CPU) the whole uint8 array of the split lives on the device and a batch is
one index gather; otherwise the cache stays memory-mapped and a background thread gathers each batch into pinned
host memory ahead of the step. Either way the step sees the same batch dict as the albumentations path
(:class:`~fer_bench.data.FaceDataset` collated): ``image`` [B, 3, S, S] normalised, ``label``, ``index``, and as the
heads need them ``target``, ``occlusion``, ``clean_image``/``has_clean`` and ``heatmap``/``heatmap_valid``/
``heatmap_source``.

The order of an epoch is :func:`fer_bench.data.sampling.epoch_order`, shared by every rank; rank r takes the strided
slice r, r + world, ... of each global batch (:func:`~fer_bench.data.sampling.rank_batch`), and every random number
of a sample's augmentation is keyed on its position in that order (:mod:`fer_bench.data.device_augment`). So 1 or N
processes, and a run resumed mid-epoch, see the same augmented images.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fer_bench.data import device_augment as DA
from fer_bench.data.au_maps import MAP_SOURCES, draw_au_maps, expression_au_mask, landmarks68, template_landmarks
from fer_bench.data.cache import CachedImages
from fer_bench.data.manifest import DatasetInfo, landmarks_array
from fer_bench.data.occluders import OCCLUDER_KINDS, check_occluder_kinds
from fer_bench.data.sampling import epoch_order, local_batch_size, rank_batch, steps_per_epoch
from fer_bench.data.transforms import AugmentOptions
from fer_bench.errors import ConfigError
from fer_bench.runtime import derive_seed

RESIDENCIES: tuple[str, ...] = ("auto", "device", "mmap")
_HEATMAP_MODES = ("codebook", "generic", "template")


def available_memory(device: torch.device) -> int:
    """Bytes free for the cache on ``device``: free GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_residency(residency: str, *, nbytes: int, device: torch.device) -> str:
    """``device`` when the cache takes at most half the free memory (``auto``), else ``mmap``."""
    if residency not in RESIDENCIES:
        raise ConfigError(f"data.residency: expected one of {list(RESIDENCIES)}, got {residency!r}")
    if residency != "auto":
        return residency
    return "device" if nbytes <= available_memory(device) // 2 else "mmap"


class _Pixels:
    """The uint8 [N, C, C, 3] images of the loader's rows: one device tensor, or the memory map."""

    def __init__(self, images: CachedImages, array_index: np.ndarray, *, device: torch.device, residency: str):
        self.images, self.array_index, self.device = images, array_index, device
        self.size = images.image_size
        nbytes = len(array_index) * self.size * self.size * 3
        self.residency = choose_residency(residency, nbytes=nbytes, device=device)
        self.resident: torch.Tensor | None = None
        if self.residency == "device":
            # uploaded in chunks, so the host never holds a second full copy (AffectNet at 224 px is 43 GB)
            n, chunk = len(array_index), 4096
            self.resident = torch.empty((n, self.size, self.size, 3), dtype=torch.uint8, device=device)
            for start in range(0, n, chunk):
                part = torch.from_numpy(images.take(array_index[start : start + chunk]))
                self.resident[start : start + len(part)] = part.to(device)

    def resize_all(self, size: int) -> None:
        """Hold every row resized to ``size`` with cv2 INTER_AREA (the evaluator's resize), on the device: what
        validation uses when the cache is larger than the training size, so it sees the test's pixels."""
        import cv2

        images = self.images.take(self.array_index)
        resized = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in images])
        self.resident = torch.from_numpy(resized.reshape(len(images), size, size, 3)).to(self.device)
        self.residency, self.size = "device", size

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda"

    def host_batch(self, rows: np.ndarray) -> torch.Tensor:
        """The rows' images gathered from the memory map into (pinned, on a GPU run) host memory."""
        batch = torch.from_numpy(self.images.take(self.array_index[rows]))
        return batch.pin_memory() if self.pin else batch

    def gather(self, rows: np.ndarray, rows_on_device: torch.Tensor, prefetched: torch.Tensor | None) -> torch.Tensor:
        if self.resident is not None:
            return self.resident.index_select(0, rows_on_device)
        host = prefetched if prefetched is not None else self.host_batch(rows)
        return host.to(self.device, non_blocking=self.pin)


class DeviceLoader:
    """Batches of one split of a cached dataset, on ``device``.

    Args:
        info: A cached dataset (:func:`fer_bench.data.cache.open_cache`; its ``images`` extra is a CachedImages).
        split: Which rows (``train`` / ``val`` / ``test``).
        device: Where the batches (and, when it fits, the cache) live.
        img_size: Output side; the cache's images are warped (or resized) to it.
        batch_size: The global batch in training; in evaluation each rank's batch.
        train: Shuffle with the shared order, drop the ragged last batch, augment; else every row of this rank's
            share (rows ``rank::world_size``) in order, resized and normalised only.
        augment: Training augmentation options.
        seed: The run's seed (orders and augmentation are pure functions of it).
        rank, world_size: This process in a distributed run.
        sampler: ``random`` or ``class_balanced``.
        heatmaps: AU maps for the ``au_heatmap`` head: ``codebook``, ``generic`` or ``template`` (drawn from the
            augmented landmarks on the device).
        occlusion_augment: Probability of a synthetic occluder on a row not known to be occluded.
        occluder_kinds: Which occluders.
        occlusion_masks: Add the dataset's own occlusion masks (SynthFER), warped with the image.
        residency: ``auto`` (the cache on the device when it takes at most half its free memory), ``device`` or
            ``mmap`` (memory-mapped, gathered into pinned memory by a background thread).
    """

    kind = "device"

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        *,
        device: torch.device,
        img_size: int,
        batch_size: int,
        train: bool = True,
        augment: AugmentOptions | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sampler: str = "random",
        heatmaps: str | None = None,
        occlusion_augment: float = 0.0,
        occluder_kinds: tuple[str, ...] = OCCLUDER_KINDS,
        occlusion_masks: bool = False,
        residency: str = "auto",
    ) -> None:
        images = info.extra("images")
        if not isinstance(images, CachedImages):
            raise ConfigError(
                f"data.loader=device needs a prepared cache (data.cache: auto or a path); {info.name} has none"
            )
        if heatmaps is not None and heatmaps not in _HEATMAP_MODES:
            raise ConfigError(f"heatmaps: the device loader draws {list(_HEATMAP_MODES)}, got {heatmaps!r}")
        rows = info.split(split)
        self.info, self.split, self.device, self.train = info, split, device, train
        self.img_size, self.seed, self.rank, self.world_size = img_size, seed, rank, world_size
        self.augment = augment or AugmentOptions()
        self.sampler, self.heatmaps = sampler, heatmaps
        self.occlusion_augment = occlusion_augment if train else 0.0
        self.occluder_kinds = check_occluder_kinds(occluder_kinds)
        self.global_batch = batch_size
        self.local_batch = local_batch_size(batch_size, world_size) if train else batch_size
        self.labels_np = rows["label"].to_numpy(dtype=np.int64, copy=True)
        if not train:  # this rank's share of the rows, in order
            keep = np.arange(rank, len(rows), world_size)
            rows, self.labels_np = rows.iloc[keep].reset_index(drop=True), self.labels_np[keep]
        self.rows = rows
        self.epoch = 0
        self.pixels = _Pixels(images, rows["array_index"].to_numpy(dtype=np.int64), device=device, residency=residency)
        if not train and self.pixels.size != img_size:
            self.pixels.resize_all(img_size)
        self.cache_size = self.pixels.size
        self.labels = torch.as_tensor(self.labels_np, device=device)
        self.target_kind = info.target_kind if train else "label"
        self.soft = None
        if self.target_kind != "label":
            self.soft = torch.as_tensor(np.stack(rows["soft_target"].map(np.asarray).to_list()), dtype=torch.float32)
            self.soft = self.soft.to(device)
        masks = info.extra("masks") if (occlusion_masks and "masks" in info.extras) else None
        self.masks = None
        if masks is not None:
            self.masks = torch.as_tensor(masks["occlusion"][rows["mask_index"].to_numpy()], device=device)
        self.known_occluded = (
            (self.masks.flatten(1) > 0).any(dim=1)
            if self.masks is not None
            else torch.zeros_like(self.labels, dtype=torch.bool)
        )
        self.wants_masks = self.occlusion_augment > 0 or self.masks is not None
        self.noise = DA.noise_bank(img_size, device=device) if self.occlusion_augment > 0 else None
        if heatmaps is not None and train:
            points, sources = self._map_points(rows, heatmaps)
            self.points68 = torch.as_tensor(points, dtype=torch.float32, device=device)
            self.map_sources = torch.as_tensor(sources, device=device)
            names = tuple(info.label_space.names)
            self.au_table = expression_au_mask(names, generic=heatmaps == "generic").to(device)

    # -----------------------------------------------------------------------------------------------------------------

    @property
    def residency(self) -> str:
        return self.pixels.residency

    def _map_points(self, rows, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """68 points per row in cache pixels (given, fitted from 5, or the template) and their MAP_SOURCES codes."""
        size = self.cache_size
        template = template_landmarks(size)
        points = np.repeat(template[None], len(rows), axis=0).astype(np.float32)
        sources = np.full(len(rows), MAP_SOURCES.index("template"), dtype=np.int64)
        if mode != "template" and "landmarks" in rows.columns:
            for k, cell in enumerate(rows["landmarks"].tolist()):
                fitted, code = landmarks68(landmarks_array(cell))
                if fitted is not None:
                    points[k], sources[k] = fitted, code
        return points, sources

    def __len__(self) -> int:
        """Steps per epoch (training) or batches of this rank's share (evaluation)."""
        if self.train:
            return steps_per_epoch(len(self.rows), self.global_batch)
        return -(-len(self.rows) // self.local_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        return epoch_order(
            len(self.rows), seed=self.seed, epoch=self.epoch, sampler=self.sampler, labels=self.labels_np
        )

    def step_rows(self, order, step: int) -> tuple:
        """(row indices, positions in the epoch's order) of this rank's part of training step ``step``; ``order`` is
        the epoch's order as a NumPy array or a device tensor, and the result is of the same kind."""
        kw = dict(step=step, global_batch=self.global_batch, rank=self.rank, world_size=self.world_size)
        positions = torch.arange(len(order), device=order.device) if torch.is_tensor(order) else np.arange(len(order))
        return rank_batch(order, **kw), rank_batch(positions, **kw)

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of the current epoch from ``start_step`` on (training), or of this rank's rows (evaluation)."""
        if not self.train:
            for start in range(0, len(self.rows), self.local_batch):
                stop = min(start + self.local_batch, len(self.rows))
                yield self._eval_batch(np.arange(start, stop), torch.arange(start, stop, device=self.device))
            return
        order = self.order()
        # The order goes to the device once per epoch; each step slices it there, so the step makes no
        # host-to-device copy (one from pageable memory would wait for the device).
        order_on_device = torch.as_tensor(order, device=self.device)
        base = derive_seed(self.seed, "augment", self.epoch)
        steps = range(start_step, len(self))
        host_rows = [self.step_rows(order, step)[0] for step in steps] if self.pixels.resident is None else None
        prefetch = self._prefetch(host_rows) if host_rows is not None else None
        for k, step in enumerate(steps):
            index, positions = self.step_rows(order_on_device, step)
            rows, prefetched = (host_rows[k], next(prefetch)) if prefetch is not None else (None, None)
            yield self._train_batch(index, positions, base, rows, prefetched)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(0)

    def _prefetch(self, plan: list[np.ndarray], depth: int = 3) -> Iterator[torch.Tensor]:
        """Host batches of ``plan`` gathered by a background thread, ``depth`` ahead of the consumer."""
        slots: queue.Queue = queue.Queue(maxsize=depth)

        def work() -> None:
            try:
                for rows in plan:
                    slots.put(self.pixels.host_batch(rows))
            except BaseException as exc:  # surfaced in the consumer
                slots.put(exc)

        threading.Thread(target=work, daemon=True, name="fer_bench-prefetch").start()
        for _ in plan:
            item = slots.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    # -----------------------------------------------------------------------------------------------------------------

    def _eval_batch(self, rows: np.ndarray, index: torch.Tensor) -> dict[str, torch.Tensor]:
        images = self.pixels.gather(rows, index, None)
        u = torch.zeros(len(rows), DA._FIELDS, device=self.device)
        geo = DA.geometry(u, self.augment, src_size=self.cache_size, out_size=self.img_size, train=False)
        x = DA.warp_images(images, geo, out_size=self.img_size)
        return {"image": DA.normalize(x), "label": self.labels[index], "index": index}

    def _train_batch(
        self,
        index: torch.Tensor,
        positions: torch.Tensor,
        base: int,
        rows: np.ndarray | None,
        prefetched: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """One augmented batch: ``index`` [B] rows and ``positions`` [B] in the epoch's order (on the device), ``base``
        the epoch's augmentation seed; ``rows``/``prefetched`` the same rows on the host and their gathered images
        (memory-mapped residency)."""
        device, size = self.device, self.img_size
        images = self.pixels.gather(rows, index, prefetched)  # [B, C, C, 3] uint8
        keys = DA.sample_keys(positions, base)
        u = DA.uniforms(keys, DA._FIELDS)
        geo = DA.geometry(u, self.augment, src_size=self.cache_size, out_size=size, train=True)
        x = DA.warp_images(images, geo, out_size=size)  # [B, 3, S, S] float 0..255
        labels = self.labels[index]
        batch: dict[str, Any] = {"label": labels, "index": index}
        clean = None
        if self.wants_masks:
            known = self.known_occluded[index]
            mask = torch.zeros(len(index), size, size, dtype=torch.uint8, device=device)
            if self.masks is not None:
                mask = (DA.warp_images(self.masks[index], geo, out_size=size, mode="nearest") > 0.5).to(torch.uint8)
            if self.occlusion_augment > 0:
                apply = ~known & (u[:, DA.F_OCCLUDE] < self.occlusion_augment)
                noise = self.noise[DA.texture_index(keys, len(self.noise))]
                occluded, drawn = DA.draw_occluders(x, u, noise, apply=apply, kinds=self.occluder_kinds)
                clean, x = x, occluded
                mask = torch.where(known.view(-1, 1, 1), mask, drawn)
                batch["has_clean"] = ~known
            batch["occlusion"] = mask
        x = self._photometric(x, u) if clean is None else self._photometric(torch.cat([x, clean]), u.repeat(2, 1))
        if clean is not None:
            x, clean = x.chunk(2)
            batch["clean_image"] = DA.normalize(clean)
        batch["image"] = DA.normalize(x)
        if self.soft is not None:
            target = self.soft[index]
            if self.target_kind == "sample":  # FER+ "probability": one class per sample and epoch
                cumulative = torch.cumsum(target / target.sum(dim=1, keepdim=True), dim=1)
                drawn = (cumulative < u[:, DA.F_TARGET : DA.F_TARGET + 1]).sum(dim=1).clamp(max=target.shape[1] - 1)
                target = torch.nn.functional.one_hot(drawn, target.shape[1]).float()
            batch["target"] = target
        if self.heatmaps is not None:
            points = DA.warp_points(self.points68[index], geo)
            maps, valid = draw_au_maps(points, self.au_table[labels], size)
            batch["heatmap"], batch["heatmap_valid"] = maps, valid
            batch["heatmap_source"] = torch.where(valid, self.map_sources[index], 0)
        return batch

    def _photometric(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x = DA.brightness_contrast(x, u, self.augment.color)
        x = DA.gaussian_blur(x, u, self.augment.blur)
        erase = DA.erasing_mask(u, self.augment.erasing, x.shape[-1])
        return x if erase is None else x.masked_fill(erase.unsqueeze(1), 0.0)
