"""The prepared cache: every image of a dataset decoded once, cropped and resized, as one uint8 array per split.

Training at GPU speed cannot decode JPEGs every epoch (a 16-core host decodes about 10k images/s, a Swin-T step wants
13k), and even the 2-core quickstart spent a quarter of each epoch in its loader. So a dataset is prepared once:

* only the deterministic steps are applied: the adapter's face-box crop (AffectNet) and a resize to ``size`` x
  ``size`` (cv2 INTER_AREA, as the evaluator's own resize); augmentation stays a training-time step;
* SynthFER is rendered straight from its generator (the same bytes as its PNGs), so nothing is decoded at all.

On disk (``DIR``)::

    DIR/cache.yaml        format version, fer_bench version, dataset, layout, source hash, parameters, counts
    DIR/<split>.npy       uint8 [N, size, size, 3] (NHWC), memory-mappable (np.load(mmap_mode="r"))
    DIR/rows.parquet      the manifest rows: labels, soft targets, groups, subsets, ``array_index`` (row in its
                          split's array), landmarks in cache pixels, and bit-packed masks in cache pixels

Writes are atomic: the cache is built in a hidden sibling folder and renamed into place, under a lock, so a killed
build leaves the old cache (or nothing) and two processes asking for the same cache build it once. An existing cache
is reused only when its source hash and parameters match; otherwise it is rebuilt and the reason is given in one line.

:func:`open_cache` returns a :class:`~fer_bench.data.DatasetInfo` whose images come from the arrays, so every
consumer (training, the evaluator, ``ferbench eval``) reads a cache exactly like the dataset it was built from.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

from fer_bench import __version__
from fer_bench._io import atomic_write_text
from fer_bench.data.dataset import crop_origin, read_image
from fer_bench.data.labels import get_label_space
from fer_bench.data.manifest import SPLITS, DatasetInfo, dataset_hash, landmarks_array
from fer_bench.errors import ConfigError, DataError

CACHE_FORMAT_VERSION = 1
DEFAULT_CACHE_SIZE = 256
_CHUNK = 64
_CACHE_FILES = frozenset({"cache.yaml", "rows.parquet", *(f"{split}.npy" for split in SPLITS)})


@dataclass(frozen=True)
class CacheSpec:
    """What a cache is built from and how; two caches with equal specs and source hashes hold the same bytes."""

    dataset: str
    size: int
    options: dict[str, Any]
    crop: bool
    source_hash: str
    # Face alignment (fer_bench.data.prepare): template, landmark source, detector and its weights' SHA-256, face
    # selection. None: the dataset's own crops, resized.
    alignment: dict[str, Any] | None = None

    def parameters(self) -> dict[str, Any]:
        parameters = {
            "format_version": CACHE_FORMAT_VERSION,
            "size": self.size,
            "interpolation": "bilinear warp" if self.alignment else "area",
            "crop_to_bbox": self.crop and not self.alignment,
            "options": {k: self.options[k] for k in sorted(self.options)},
        }
        if self.alignment:
            parameters["alignment"] = dict(self.alignment)
        return parameters


class CachedImages:
    """The cache's per-split arrays behind one index: ``images[array_index]`` is an RGB uint8 [S, S, 3] image,
    ``images.take(indices)`` a [n, S, S, 3] batch. Memory-mapped, so opening costs nothing and forked or pickled
    copies (DataLoader workers) share the page cache instead of the bytes."""

    def __init__(self, folder: Path, counts: dict[str, int]) -> None:
        self.folder = Path(folder)
        self.splits = [s for s in SPLITS if counts.get(s, 0) > 0]
        self.counts = {s: int(counts[s]) for s in self.splits}
        self.offsets = np.cumsum([0] + [self.counts[s] for s in self.splits])
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "splits": self.splits, "counts": self.counts, "offsets": self.offsets}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arrays = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {s: np.load(self.folder / f"{s}.npy", mmap_mode="r") for s in self.splits}
        return self._arrays

    @property
    def image_size(self) -> int:
        return int(next(iter(self.arrays.values())).shape[1]) if self.splits else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"cache index {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.splits[k], index - int(self.offsets[k])

    def __getitem__(self, index: int) -> np.ndarray:
        split, local = self._locate(int(index))
        return self.arrays[split][local]

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` (any order) as one uint8 [n, S, S, 3] array; each split is read in sorted order
        so a memory-mapped read walks the file forwards."""
        indices = np.asarray(indices, dtype=np.int64)
        size = self.image_size
        out = np.empty((len(indices), size, size, 3), np.uint8)
        split_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for k, split in enumerate(self.splits):
            where = np.nonzero(split_of == k)[0]
            if len(where):
                local = indices[where] - self.offsets[k]
                order = np.argsort(local, kind="stable")
                out[where[order]] = self.arrays[split][local[order]]
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Where caches live and whether one is current


def default_cache_root() -> Path:
    """``$FER_BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fer_bench``, else ``~/.cache/fer_bench``."""
    if os.environ.get("FER_BENCH_CACHE_DIR"):
        return Path(os.environ["FER_BENCH_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fer_bench"


def auto_cache_dir(
    dataset: str, root: str | os.PathLike, *, size: int, options: dict[str, Any], alignment: dict | None = None
) -> Path:
    """The folder ``data.cache: auto`` uses for ``dataset`` at ``root``: one per (dataset, absolute root, options,
    size, alignment), so a changed dataset in the same folder is rebuilt in place rather than piling up."""
    key = f"{dataset}|{Path(root).resolve()}|{sorted(options.items())}|{size}"
    if alignment:
        key += f"|{sorted(alignment.items())}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    aligned = f"-{alignment['template']}" if alignment else ""
    return default_cache_root() / f"{dataset}{aligned}-{size}px-{digest}"


def source_fingerprint(info: DatasetInfo) -> str:
    """SHA-256 of what the cache's bytes depend on: the manifest (ids, splits, labels, paths, boxes, landmarks,
    soft targets), the label space, and each image file's size and modification time (or the in-memory pixel array,
    or SynthFER's generation parameters). A changed annotation or image changes it; reading the images does not."""
    h = hashlib.sha256()
    h.update(f"{info.name}|{info.label_space.name}|{','.join(info.label_space.names)}\n".encode())
    manifest = info.manifest
    for column in manifest.columns:  # every column travels into rows.parquet (groups, subsets, AU intensities, ...)
        h.update(str(column).encode())
        _hash_column(h, manifest[column].tolist())
    h.update(f"{info.group_columns}|{info.subset_columns}|{info.target_kind}|{info.splits}".encode())
    synth = info.extras.get("synth_config")
    if synth is not None:  # the generator's parameters, its version included, and the code that renders
        h.update(f"{synth!r}|fer_bench {__version__}".encode())
        return h.hexdigest()
    images = info.extra("images")
    if isinstance(images, np.ndarray):
        h.update(np.ascontiguousarray(images).tobytes())
    elif "path" in manifest.columns:
        for path in manifest["path"].tolist():
            if path:
                try:
                    st = os.stat(info.root / path)
                    h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{path}|missing\n".encode())
    return h.hexdigest()


def _hash_column(h, values: list) -> None:
    """Feed a manifest column to ``h``: numeric sequences (landmarks, boxes, soft targets) as float64 bytes with
    their lengths, everything else as text (str() of a NumPy array is far too slow for 300k rows)."""
    numeric = [v for v in values if isinstance(v, list | tuple | np.ndarray)]
    if numeric and len(numeric) == len(values):
        arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
        h.update(np.array([len(a) for a in arrays], dtype=np.int64).tobytes())
        h.update(np.concatenate(arrays).tobytes() if arrays else b"")
        return
    h.update("\x1f".join(map(str, values)).encode())


def cache_spec(
    info: DatasetInfo, *, size: int, options: dict[str, Any] | None = None, alignment: dict | None = None
) -> CacheSpec:
    """The :class:`CacheSpec` of ``info`` at ``size`` px (hashes the source: see :func:`source_fingerprint`)."""
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise ConfigError(f"cache size: expected an integer in [16, 1024], got {size!r}")
    return CacheSpec(
        dataset=info.name,
        size=size,
        options=dict(options or {}),
        crop=bool(info.crop_to_bbox),
        source_hash=source_fingerprint(info),
        alignment=alignment,
    )


def read_cache_card(folder: Path) -> dict[str, Any]:
    """``cache.yaml`` of ``folder`` as a dict; DataError naming the file when it is missing or unreadable."""
    path = folder / "cache.yaml"
    if not path.is_file():
        raise DataError(f"{path}: missing; {folder} is not a fer_bench cache (build one with ferbench data cache)")
    try:
        card = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(card, dict) or not isinstance(card.get("parameters"), dict):
        raise DataError(f"{path}: not a fer_bench cache card (expected a 'parameters' mapping and 'counts')")
    counts = card.get("counts")
    if not isinstance(counts, dict) or not all(
        s in SPLITS and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for s, n in counts.items()
    ):
        raise DataError(f"{path}: 'counts' must map splits {list(SPLITS)} to image counts, got {counts!r}")
    if not isinstance(card["parameters"].get("size"), int):
        raise DataError(
            f"{path}: parameters.size must be the image side in pixels, got {card['parameters'].get('size')!r}"
        )
    return card


def stale_reason(folder: Path, spec: CacheSpec) -> str | None:
    """Why the cache in ``folder`` cannot be reused for ``spec`` (one line), or None when it can."""
    if not folder.exists():
        return "no cache there yet"
    try:
        card = read_cache_card(folder)
    except DataError as exc:
        return str(exc)
    if card.get("dataset") != spec.dataset:
        return f"it holds dataset {card.get('dataset')!r}, not {spec.dataset!r}"
    wanted, found = spec.parameters(), card["parameters"]
    for key in wanted:
        if found.get(key) != wanted[key]:
            return f"{key} changed: {found.get(key)!r} -> {wanted[key]!r}"
    if card.get("source_hash") != spec.source_hash:
        return f"the source changed (hash {str(card.get('source_hash'))[:12]} -> {spec.source_hash[:12]})"
    return integrity_problem(folder, card)


def integrity_problem(folder: Path, card: dict[str, Any]) -> str | None:
    """A missing, truncated or mis-shaped array or table (one line), or None when the files agree with the card."""
    size = int(card["parameters"]["size"])
    for split, count in card["counts"].items():
        path = folder / f"{split}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{path.name} is unreadable ({str(exc).splitlines()[0][:100]})"
        if array.shape != (int(count), size, size, 3) or array.dtype != np.uint8:
            return f"{path.name} holds {array.dtype} {array.shape}, expected uint8 {(int(count), size, size, 3)}"
    rows = folder / "rows.parquet"
    try:
        import pyarrow.parquet as pq

        n_rows = pq.ParquetFile(rows).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
        return f"rows.parquet is unreadable ({type(exc).__name__})"
    if n_rows != sum(int(c) for c in card["counts"].values()):
        return f"rows.parquet has {n_rows} rows, the arrays {sum(card['counts'].values())}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock for building ``folder``: a second process waits, then finds the cache built."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): builds are still atomic, just not serialised
            pass
        yield


def source_image(*, root, path: str, array_index, image_id: str, image_array, synth_config) -> np.ndarray:
    """One row's full RGB uint8 image: rendered by the SynthFER generator, or read (file or in-memory array)."""
    if synth_config is not None:
        from fer_bench.data.synthfer import render_image

        return render_image(synth_config, image_id)
    return read_image(root=root, path=path, image_array=image_array, array_index=array_index)


def _load_pixels(task: tuple) -> list[tuple[int, int, int, int, int]]:
    """Worker: decode (or render) a chunk of rows, then crop and resize them (or warp them with their alignment
    matrix) into the split's array; returns each row's (array_index, crop x0, y0, width, height) for moving landmarks
    and masks into cache pixels (the whole image for aligned rows, whose matrix says where things went)."""
    array_path, size, root, rows, image_array, synth_config = task
    cv2.setNumThreads(1)
    target = np.load(array_path, mmap_mode="r+")
    origins = []
    for local, path, array_index, bbox, image_id, matrix in rows:
        image = source_image(
            root=root,
            path=path,
            array_index=array_index,
            image_id=image_id,
            image_array=image_array,
            synth_config=synth_config,
        )
        if matrix is not None:
            from fer_bench.faces import warp_image

            target[local] = warp_image(image, np.asarray(matrix, np.float64).reshape(2, 3), size)
            origins.append((local, 0, 0, image.shape[1], image.shape[0]))
            continue
        x0, y0, w, h = crop_origin(bbox, image.shape)
        image = image[y0 : y0 + h, x0 : x0 + w]
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        target[local] = image
        origins.append((local, x0, y0, w, h))
    target.flush()
    return origins


def crop_matrix(origin: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The 2x3 matrix taking image pixels into a cache image made by cropping ``origin`` (x0, y0, w, h) and
    resizing to ``size``: pixel centres map as (x - x0 + 0.5) * size / w - 0.5, as cv2's resize moves them."""
    x0, y0, w, h = origin
    sx, sy = size / w, size / h
    return np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]], np.float64)


def _cache_landmarks(cell, matrix: np.ndarray) -> list[float] | None:
    points = landmarks_array(cell)
    if points is None:
        return None
    moved = points.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return [round(float(v), 3) for v in moved.astype(np.float32).reshape(-1)]


def _moved_regions(regions: np.ndarray, matrix, origin: tuple[int, int, int, int], size: int) -> np.ndarray:
    """AU region masks [n_AU, g, g] (a grid over the whole image) after the row's alignment warp, on a grid of the
    same side over the aligned crop, flattened; unchanged for a plain resize, which keeps the grid's frame."""
    if matrix is None:
        return regions.reshape(-1)
    grid = regions.shape[-1]
    width, height = origin[2], origin[3]

    def cells_to_pixels(sx: float, sy: float) -> np.ndarray:  # centre of cell c at c * s + (s - 1) / 2
        return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])

    to_image = cells_to_pixels(width / grid, height / grid)
    to_grid = np.linalg.inv(cells_to_pixels(size / grid, size / grid))
    m = to_grid @ np.vstack([np.asarray(matrix, np.float64).reshape(2, 3), [0, 0, 1]]) @ to_image
    return np.stack([cv2.warpAffine(r, m[:2], (grid, grid), flags=cv2.INTER_NEAREST) for r in regions]).reshape(-1)


def _packed_masks(masks: np.ndarray, indices: np.ndarray, origins: list, matrices: list, size: int) -> list[bytes]:
    out = []
    for index, (x0, y0, w, h), matrix in zip(indices, origins, matrices, strict=True):
        mask = masks[int(index)]
        if matrix is not None:  # aligned: the mask follows the face through the same warp
            m = np.asarray(matrix, np.float64).reshape(2, 3)
            mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST)
        else:
            mask = mask[y0 : y0 + h, x0 : x0 + w]
            if mask.shape != (size, size):
                mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        out.append(np.packbits(mask.reshape(-1) > 0).tobytes())
    return out


def build_cache(
    info: DatasetInfo,
    *,
    out: str | os.PathLike,
    spec: CacheSpec,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the cache of ``info`` described by ``spec`` into ``out`` (atomically; an old cache there is replaced).

    Args:
        info: The dataset as its adapter read it.
        out: The cache folder.
        spec: From :func:`cache_spec`.
        workers: Decoding processes (default: all cores); the bytes written do not depend on it.
        progress: Called as ``progress(done, total)`` after each chunk of images.
    """
    out = Path(out)
    size = spec.size
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed build's leftovers (we hold the lock)
    tmp.mkdir(parents=True)
    manifest = info.manifest.reset_index(drop=True)
    counts = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    counts = {s: n for s, n in counts.items() if n}
    synth_config = info.extras.get("synth_config")
    image_array = None if synth_config is not None else info.extra("images")
    aligned = "align_matrix" in manifest.columns
    crop = info.crop_to_bbox and "bbox" in manifest.columns and not aligned
    tasks, order = [], []
    for split, count in counts.items():
        np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
        rows = manifest.index[manifest["split"] == split].to_numpy()
        order.extend(rows.tolist())
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            payload = [
                (
                    start + k,
                    manifest.at[r, "path"] if "path" in manifest.columns else "",
                    manifest.at[r, "array_index"] if image_array is not None else None,
                    manifest.at[r, "bbox"] if crop else None,
                    manifest.at[r, "image_id"],
                    manifest.at[r, "align_matrix"] if aligned else None,
                )
                for k, r in enumerate(chunk)
            ]
            tasks.append((tmp / f"{split}.npy", size, info.root, payload, image_array, synth_config))
    total = sum(counts.values())
    done = 0
    origins: dict[tuple[str, int], tuple[int, int, int, int]] = {}
    task_splits = [Path(t[0]).stem for t in tasks]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    try:
        if workers == 1:
            results = map(_load_pixels, tasks)
            pool = None
        else:
            pool = mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers)
            results = pool.imap(_load_pixels, tasks)
        with pool if pool is not None else contextlib.nullcontext():
            for split, part in zip(task_splits, results, strict=True):
                for local, *origin in part:
                    origins[(split, local)] = tuple(origin)
                done += len(part)
                if progress:
                    progress(done, total)
        rows_table = _cache_rows(info, manifest, counts, origins, size)
        rows_table.to_parquet(tmp / "rows.parquet", index=False)
        card = {
            "format_version": CACHE_FORMAT_VERSION,
            "fer_bench": __version__,
            "dataset": info.name,
            "layout": info.layout,
            "source_root": str(Path(info.root).resolve()),
            "source_hash": spec.source_hash,
            # the evaluator's hash of the ordered (image_id, label) rows: results from the cache carry the same one
            "dataset_hash": dataset_hash(manifest["image_id"].astype(str), manifest["label"]),
            "parameters": spec.parameters(),
            "counts": counts,
            "label_space": info.label_space.name,
            "group_columns": list(info.group_columns),
            "subset_columns": list(info.subset_columns),
            "target_kind": info.target_kind,
            "splits": info.splits,
            "resolved_options": dict(info.extras.get("resolved_options", {})),
            "dropped": {k: int(v) for k, v in info.dropped.items()},
            "notes": list(info.notes),
            "pixels": "rendered by the SynthFER generator" if synth_config is not None else "decoded",
            **({"alignment": info.extras["alignment"]} if "alignment" in info.extras else {}),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(tmp / "cache.yaml", yaml.safe_dump(card, sort_keys=False))
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _cache_rows(
    info: DatasetInfo,
    manifest: pd.DataFrame,
    counts: dict[str, int],
    origins: dict[tuple[str, int], tuple[int, int, int, int]],
    size: int,
) -> pd.DataFrame:
    """The manifest in cache terms: ``array_index`` per split, landmarks and masks in cache pixels, no path/bbox."""
    parts = []
    masks = info.extra("masks") if "masks" in info.extras else None
    for split in counts:
        rows = manifest[manifest["split"] == split].reset_index(drop=True).copy()
        split_origins = [origins[(split, k)] for k in range(len(rows))]
        aligned = list(rows["align_matrix"]) if "align_matrix" in rows.columns else [None] * len(rows)
        matrices = [
            crop_matrix(o, size) if m is None else np.asarray(m, np.float64).reshape(2, 3)
            for o, m in zip(split_origins, aligned, strict=True)
        ]
        rows["array_index"] = np.arange(len(rows), dtype=np.int64)
        for column in ("landmarks", "face_landmarks"):
            if column in rows.columns:
                rows[column] = [_cache_landmarks(c, m) for c, m in zip(rows[column], matrices, strict=True)]
        if masks is not None and "mask_index" in rows.columns:
            index = rows["mask_index"].to_numpy()
            rows["occlusion_bits"] = _packed_masks(masks["occlusion"], index, split_origins, aligned, size)
            regions = masks["au_regions"]
            rows["au_regions_bits"] = [
                np.packbits(_moved_regions(regions[int(i)], m, o, size)).tobytes()
                for i, m, o in zip(index, aligned, split_origins, strict=True)
            ]
            rows["au_regions_shape"] = [list(regions.shape[1:])] * len(rows)
        parts.append(rows.drop(columns=[c for c in ("path", "bbox", "align_matrix") if c in rows.columns]))
    return pd.concat(parts, ignore_index=True) if parts else manifest.iloc[:0]


def prepare_cache(
    info: DatasetInfo,
    *,
    out: str | os.PathLike,
    size: int,
    options: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    message: Callable[[str], None] = print,
    alignment: dict[str, Any] | None = None,
    before_build: Callable[[DatasetInfo], DatasetInfo] | None = None,
) -> Path:
    """Reuse the cache in ``out`` when it matches ``info`` at ``size`` px, else (re)build it, saying why in one line.

    Safe against concurrent callers (a lock serialises builds) and against being killed (builds are atomic).

    Args:
        alignment: The face alignment's parameters (``fer_bench.data.prepare``), part of the cache's identity.
        before_build: Turns ``info`` into the rows to write, under the lock and only when building (detection).
    """
    out = Path(out)
    check_cache_folder(out)
    spec = cache_spec(info, size=size, options=options, alignment=alignment)
    try:
        return _prepare(
            info,
            out=out,
            spec=spec,
            size=size,
            workers=workers,
            progress=progress,
            message=message,
            before_build=before_build,
        )
    except OSError as exc:  # an unwritable, read-only or busy place: one line naming it, not a traceback
        where = exc.filename or out
        raise DataError(f"{where}: {exc.strerror or exc} (while preparing the cache {out})") from None


def check_cache_folder(out: Path) -> None:
    """Refuse a cache location that holds anything fer_bench did not write there: replacing it (a rebuild renames
    the whole folder) would delete the user's files. An empty folder, a missing one or a cache is fine.

    Raises:
        ConfigError: ``out`` is a file, or a folder with files that are not a cache's.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"cache folder {out}: is a file, not a folder; choose another --out / data.cache")
    present = sorted(p.name for p in out.iterdir())
    foreign = [name for name in present if name not in _CACHE_FILES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"cache folder {out}: holds files a fer_bench cache does not ({shown}); it is not a cache and would be "
            "replaced by one, so choose another folder"
        )
    whole = {"cache.yaml", "rows.parquet"} <= set(present) and any(name.endswith(".npy") for name in present)
    if present and not whole and not _written_by_fer_bench(out / "cache.yaml"):
        # files with a cache's names (someone's train.npy) are still not ours to replace; a damaged cache (all its
        # files there, its card unreadable) is rebuilt
        raise ConfigError(
            f"cache folder {out}: holds {', '.join(present[:3])} but no cache.yaml written by fer_bench; it is not a "
            "cache and would be replaced by one, so choose another folder"
        )


def _written_by_fer_bench(card_path: Path) -> bool:
    try:
        card = yaml.safe_load(card_path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(card, dict) and "format_version" in card and "fer_bench" in card


def _prepare(info, *, out: Path, spec: CacheSpec, size: int, workers, progress, message, before_build=None) -> Path:
    with _locked(out):
        reason = stale_reason(out, spec)
        if reason is None:
            card = read_cache_card(out)
            message(f"cache {out}: reused ({_counts_text(card['counts'])} at {size} px)")
            return out
        total = len(info.manifest)
        verb = "rebuilding" if out.exists() else "building"
        message(f"cache {out}: {verb} ({reason}); {total} images at {size} px")
        started = time.time()
        if before_build is not None:
            info = before_build(info)
        build_cache(info, out=out, spec=spec, workers=workers, progress=progress)
        message(f"cache {out}: built in {time.time() - started:.1f} s")
    return out


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {count}" for split, count in counts.items())


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def open_cache(folder: str | os.PathLike) -> DatasetInfo:
    """The dataset stored in cache ``folder``, as a DatasetInfo whose images are the cache's arrays.

    Raises:
        DataError: not a cache, or a cache whose files do not agree with its card (names the file).
    """
    folder = Path(folder)
    card = read_cache_card(folder)
    problem = integrity_problem(folder, card)
    if problem:
        command = "data prepare ... --align TEMPLATE" if card.get("alignment") else "data cache ..."
        raise DataError(f"cache {folder}: {problem}; rebuild it (ferbench {command} --out {folder})")
    rows = pd.read_parquet(folder / "rows.parquet")
    images = CachedImages(folder, card["counts"])
    offsets = {split: int(images.offsets[k]) for k, split in enumerate(images.splits)}
    rows["array_index"] = rows["array_index"].to_numpy() + rows["split"].map(offsets).to_numpy()
    rows["path"] = ""
    size = int(card["parameters"]["size"])
    extras: dict[str, Any] = {"images": images, "image_size": size, "cache": str(folder)}
    alignment = card.get("alignment")
    if alignment:
        extras["alignment"] = alignment
    if card.get("resolved_options"):
        extras["resolved_options"] = dict(card["resolved_options"])
    if "occlusion_bits" in rows.columns:
        rows["mask_index"] = np.arange(len(rows), dtype=np.int64)
        extras["masks"] = lambda: _unpack_masks(rows, size)
    for column in ("soft_target", "au_intensity", "face_box"):
        if column in rows.columns:
            rows[column] = [np.asarray(v, dtype=np.float32) for v in rows[column]]
    for column in ("landmarks", "face_landmarks"):
        if column in rows.columns:
            rows[column] = [None if v is None else np.asarray(v, dtype=np.float32) for v in rows[column]]
    manifest = rows.drop(columns=[c for c in ("occlusion_bits", "au_regions_bits", "au_regions_shape") if c in rows])
    info = DatasetInfo(
        name=card["dataset"],
        root=Path(card.get("source_root", folder)),
        layout=f"{card.get('layout', '')}; prepared cache {size} px{describe_alignment(alignment, prefix=', ')}".lstrip(
            "; "
        ),
        label_space=get_label_space(card["label_space"]),
        manifest=manifest,
        group_columns=tuple(card.get("group_columns", ())),
        subset_columns=tuple(card.get("subset_columns", ())),
        dropped=dict(card.get("dropped") or {}),
        extras=extras,
        splits=card.get("splits", card.get("protocol", "")),  # "protocol": caches before 0.1.1
        crop_to_bbox=False,
        target_kind=card.get("target_kind", "label"),
        notes=[*card.get("notes", []), f"images read from the prepared cache {folder} ({size} px)"],
    )
    return info


def describe_alignment(alignment: dict[str, Any] | None, *, prefix: str = "") -> str:
    """One phrase for a cache's alignment: "aligned to arcface224 (mtcnn landmarks, weights 1a2b3c4d5e6f)"; empty for
    the dataset's own crops."""
    if not alignment:
        return ""
    source = (
        f"{alignment.get('detector')} landmarks, weights {str(alignment.get('weights_sha256', ''))[:12]}"
        if alignment.get("landmarks") == "detector"
        else "the dataset's landmarks"
    )
    return f"{prefix}aligned to {alignment.get('template')} ({source})"


def _unpack_masks(rows: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    occlusion = np.stack(
        [
            np.unpackbits(np.frombuffer(b, np.uint8), count=size * size).reshape(size, size)
            for b in rows["occlusion_bits"]
        ]
    )
    shape = tuple(int(v) for v in rows["au_regions_shape"].iloc[0])
    count = int(np.prod(shape))
    regions = np.stack(
        [np.unpackbits(np.frombuffer(b, np.uint8), count=count).reshape(shape) for b in rows["au_regions_bits"]]
    )
    return {"occlusion": occlusion, "au_regions": regions}


def cached_dataset(
    info: DatasetInfo,
    *,
    cache: str,
    size: int | None,
    default_size: int = DEFAULT_CACHE_SIZE,
    options: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    message: Callable[[str], None] = print,
) -> DatasetInfo:
    """``info`` served from a prepared cache, built or rebuilt when needed; returns the cached DatasetInfo.

    Args:
        cache: ``auto`` (a folder under :func:`default_cache_root`, one per dataset, root, options and size) or a
            cache folder.
        size: Side of the cached images; None keeps the size of an existing cache folder, else ``default_size``.
        options: The adapter options the dataset was read with (defaults are filled in, so the CLI's
            ``ferbench data cache`` and a recipe's ``data.cache: auto`` name the same cache).
    """
    from fer_bench.data._registry import dataset_options

    options = {**dataset_options(info.name), **(options or {})}
    if size is None and cache != "auto" and (Path(cache) / "cache.yaml").is_file():
        with contextlib.suppress(DataError, KeyError, TypeError, ValueError):
            size = int(read_cache_card(Path(cache))["parameters"]["size"])
    size = size or default_size
    folder = auto_cache_dir(info.name, info.root, size=size, options=options) if cache == "auto" else Path(cache)
    if cache != "auto" and (folder / "cache.yaml").is_file():
        alignment = read_cache_card(folder).get("alignment")
        if alignment:  # rebuilding it as a plain cache would throw away the detection and alignment work
            raise ConfigError(
                f"cache {folder}: holds faces{describe_alignment(alignment, prefix=' ')}, made by ferbench data "
                "prepare; train on it with data.cache set to it (its alignment is adopted), or choose another folder"
            )
    prepare_cache(info, out=folder, size=size, options=options, workers=workers, progress=progress, message=message)
    return open_cache(folder)
