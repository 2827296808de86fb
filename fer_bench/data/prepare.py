"""Aligned caches: detect (or read) five landmarks per image, align each face onto a named template, and write the
result in the prepared-cache format (:mod:`fer_bench.data.cache`), so training and the evaluator read it like any
cache.

Two landmark sources:

* ``detector``: a face detector (RetinaFace or MTCNN, :mod:`fer_bench.faces`) runs on the full images in batches.
  An image with no face is dropped and counted; an image with several faces keeps the one the dataset's own face box
  overlaps most (IoU > 0.3) when it ships one (AffectNet), else the largest or the most confident, or is dropped
  (``select``); nothing is silently mis-cropped: every outcome is counted by reason (and per split) in ``cache.yaml``,
  and the evaluator's report says how many images of the split it scores were dropped.
* ``dataset``: the landmarks the dataset ships (RAF-DB's five manual points, AffectNet's 68, SynthFER's 68).

Each cache row keeps the detection score, the face box and the number of faces found; ``face_landmarks`` (the five
points) and ``landmarks`` (the dataset's 68 points, or a 68-point mean shape fitted to the five) are in cache pixels;
``face_box`` stays in the source image's pixels.
``cache.yaml`` records the template, the landmark source, the detector and the SHA-256 of its weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou

from fer_bench.data.cache import (
    DEFAULT_CACHE_SIZE,
    auto_cache_dir,
    open_cache,
    prepare_cache,
    read_cache_card,
    source_image,
)
from fer_bench.data.manifest import DatasetInfo, landmarks_array
from fer_bench.errors import ConfigError, DataError
from fer_bench.faces import alignment_matrices, fit_68_from_5, five_from_68, get_template
from fer_bench.options import check_choice

LANDMARK_SOURCES = ("detector", "dataset")
SELECTIONS = ("largest", "confident", "drop")


def check_alignment_choices(*, template: str, landmarks: str, select: str) -> None:
    """ConfigError (UnknownNameError for the template, with suggestions) naming a choice that does not exist;
    callable before any work is done."""
    get_template(template)
    check_choice("--landmarks", landmarks, LANDMARK_SOURCES)
    check_choice("--select", select, SELECTIONS)


def alignment_parameters(
    *, template: str, landmarks: str, detector=None, select: str = "largest", detector_options: dict | None = None
) -> dict[str, Any]:
    """What an aligned cache is made with (part of its identity: change any of it and the cache is rebuilt)."""
    check_alignment_choices(template=template, landmarks=landmarks, select=select)
    if landmarks == "detector" and detector is None:
        raise ConfigError("landmarks=detector needs a detector (--detector retinaface|mtcnn)")
    parameters: dict[str, Any] = {"template": template, "landmarks": landmarks}
    if landmarks == "detector":
        parameters.update(
            detector=detector.name,
            weights_sha256=detector.weights_sha256,
            select=select,
            detector_options=dict(sorted((detector_options or {}).items())),
        )
    return parameters


def choose_face(faces, *, select: str, dataset_box=None) -> tuple[int | None, str]:
    """Which of ``faces`` (a :class:`fer_bench.faces.Faces`) to keep, and why (the reason counted in cache.yaml)."""
    if len(faces) == 0:
        return None, "dropped: no face"
    if len(faces) == 1:
        return 0, "one face"
    if dataset_box is not None and not (isinstance(dataset_box, float) and np.isnan(dataset_box)):
        box = torch.as_tensor(np.asarray(dataset_box, np.float32)).reshape(1, 4)
        overlap = box_iou(box, torch.from_numpy(faces.boxes))[0].numpy()
        if overlap.max() > 0.3:
            return int(overlap.argmax()), "several faces: kept the one in the dataset's face box"
    if select == "drop":
        return None, "dropped: several faces"
    if select == "largest":
        areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
        return int(areas.argmax()), "several faces: kept the largest"
    return int(faces.scores.argmax()), "several faces: kept the most confident"


def locate_faces(
    info: DatasetInfo,
    *,
    landmarks: str,
    detector=None,
    select: str = "largest",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Five landmarks per manifest row (image pixels), from the detector or the dataset.

    Returns a frame aligned with ``info.manifest`` with ``face_landmarks`` (10 floats or None), ``face_box``,
    ``face_score`` (NaN for dataset landmarks), ``faces_found`` and ``outcome`` (why a row is kept or dropped).
    """
    manifest = info.manifest.reset_index(drop=True)
    n = len(manifest)
    out = pd.DataFrame(
        {
            "face_landmarks": [None] * n,
            "face_box": [None] * n,
            "face_score": np.full(n, np.nan, np.float32),
            "faces_found": np.zeros(n, np.int64),
            "outcome": [""] * n,
        }
    )
    if landmarks == "dataset":
        if "landmarks" not in manifest.columns:
            other = "landmarks_original" in manifest.columns  # RAF-DB: the manual points locate the original images
            hint = (
                "its landmarks are for the original images: pass --option images=original"
                if other
                else ("use --landmarks detector")
            )
            raise DataError(
                f"{info.name} at {info.root}: ships no landmarks for these images, so --landmarks dataset cannot align "
                f"them; {hint}"
            )
        for k, cell in enumerate(manifest["landmarks"]):
            points = landmarks_array(cell)
            if points is None or len(points) not in (5, 68) or not np.isfinite(points).all():
                out.at[k, "outcome"] = "dropped: no landmarks"
                continue
            five = five_from_68(points) if len(points) == 68 else points
            out.at[k, "face_landmarks"] = five.reshape(-1).tolist()
            lo, hi = points.min(0), points.max(0)
            out.at[k, "face_box"] = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
            out.at[k, "faces_found"] = 1
            out.at[k, "outcome"] = "dataset landmarks"
        if progress:
            progress(n, n)
        return out

    synth_config = info.extras.get("synth_config")
    image_array = None if synth_config is not None else info.extra("images")
    has_path = "path" in manifest.columns

    def load(k: int) -> np.ndarray:
        try:
            return source_image(
                root=info.root,
                path=manifest.at[k, "path"] if has_path else "",
                array_index=manifest.at[k, "array_index"] if image_array is not None else None,
                image_id=manifest.at[k, "image_id"],
                image_array=image_array,
                synth_config=synth_config,
            )
        except DataError:
            raise
        except Exception as exc:  # a decoder's own error type: name the image
            raise DataError(f"{info.root}/{manifest.at[k, 'path'] if has_path else k}: unreadable ({exc})") from None

    boxes = manifest["bbox"] if "bbox" in manifest.columns else None
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, n, batch_size):
            rows = list(range(start, min(n, start + batch_size)))
            images = list(pool.map(load, rows))
            for k, faces in zip(rows, detector.detect(images), strict=True):
                chosen, outcome = choose_face(faces, select=select, dataset_box=None if boxes is None else boxes[k])
                out.at[k, "faces_found"] = len(faces)
                out.at[k, "outcome"] = outcome
                if chosen is not None:
                    out.at[k, "face_landmarks"] = faces.landmarks[chosen].reshape(-1).astype(float).tolist()
                    out.at[k, "face_box"] = faces.boxes[chosen].astype(float).tolist()
                    out.at[k, "face_score"] = faces.scores[chosen]
            if progress:
                progress(rows[-1] + 1, n)
    return out


def aligned_rows(info: DatasetInfo, located: pd.DataFrame, *, template: str, size: int) -> DatasetInfo:
    """``info`` restricted to the rows with a face, each with its alignment matrix (``align_matrix``) and face
    columns; the dropped rows are counted by reason in ``dropped``."""
    manifest = info.manifest.reset_index(drop=True)
    keep = located["face_landmarks"].notna().to_numpy()
    if not keep.any():
        counts = located["outcome"].value_counts().to_dict()
        raise DataError(f"{info.name} at {info.root}: no image kept a face ({counts}); nothing to align")
    five = np.stack([np.asarray(v, np.float32).reshape(5, 2) for v in located.loc[keep, "face_landmarks"]])
    matrices = alignment_matrices(five, template=template, size=size).numpy().astype(np.float64)
    rows = manifest[keep].reset_index(drop=True).copy()
    rows["align_matrix"] = [m.reshape(-1).tolist() for m in matrices]
    for column in ("face_landmarks", "face_box", "face_score", "faces_found"):
        rows[column] = located.loc[keep, column].to_list()
    has68 = "landmarks" in rows.columns
    own = [landmarks_array(v) if has68 else None for v in (rows["landmarks"] if has68 else [None] * len(rows))]
    fitted = fit_68_from_5(five)
    rows["landmarks"] = [
        (o.reshape(-1).tolist() if o is not None and len(o) == 68 else f.reshape(-1).tolist())
        for o, f in zip(own, fitted, strict=True)
    ]
    dropped = dict(info.dropped)
    for outcome, count in located.loc[~keep, "outcome"].value_counts().items():
        dropped[str(outcome).removeprefix("dropped: ")] = int(count)
    outcomes = {str(k): int(v) for k, v in located["outcome"].value_counts().items()}
    lost = located.loc[~keep, "outcome"].groupby(manifest.loc[~keep, "split"].to_numpy()).value_counts()
    dropped_by_split: dict[str, dict[str, int]] = {}
    for (split, outcome), count in lost.items():
        dropped_by_split.setdefault(str(split), {})[str(outcome).removeprefix("dropped: ")] = int(count)
    fitted_count = sum(1 for o in own if o is None or len(o) != 68)
    extras = dict(info.extras)
    extras["alignment_outcomes"] = outcomes
    extras["dropped_by_split"] = dropped_by_split
    extras["landmarks68"] = (
        "the dataset's 68 points"
        if fitted_count == 0
        else f"a 68-point mean shape fitted to the 5 points on {fitted_count} of {len(rows)} rows (region priors)"
    )
    return replace(info, manifest=rows, dropped=dropped, extras=extras, crop_to_bbox=False)


def prepare_aligned(
    info: DatasetInfo,
    *,
    template: str,
    size: int | None = None,
    landmarks: str = "detector",
    detector=None,
    select: str = "largest",
    detector_options: dict | None = None,
    out: str | os.PathLike | None = None,
    options: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    message: Callable[[str], None] = print,
) -> Path:
    """Build (or reuse) the aligned cache of ``info``; returns its folder.

    Args:
        template: An alignment template (``fer_bench.faces.list_templates()``).
        size: Side of the aligned crops (default: the template's own size).
        landmarks: ``detector`` or ``dataset``.
        detector: A :class:`fer_bench.faces.FaceDetector` (for ``landmarks="detector"``).
        select: With several faces and no dataset box: ``largest``, ``confident`` or ``drop``.
        out: The cache folder (default: one per dataset, root, options, alignment and size under the cache root).
        progress: Called as ``progress(stage, done, total)``, stage ``detecting`` then ``warping``.
    """
    from fer_bench.data._registry import dataset_options

    size = size or get_template(template).size
    options = {**dataset_options(info.name), **(options or {})}
    alignment = alignment_parameters(
        template=template, landmarks=landmarks, detector=detector, select=select, detector_options=detector_options
    )
    folder = Path(out) if out else auto_cache_dir(info.name, info.root, size=size, options=options, alignment=alignment)

    def align(source: DatasetInfo) -> DatasetInfo:
        located = locate_faces(
            source,
            landmarks=landmarks,
            detector=detector,
            select=select,
            progress=(lambda d, t: progress("detecting", d, t)) if progress else None,
        )
        aligned = aligned_rows(source, located, template=template, size=size)
        record = {
            **alignment,
            "size": size,
            "template_points": get_template(template).at(size).round(4).tolist(),
            "outcomes": aligned.extras["alignment_outcomes"],
            "dropped_by_split": aligned.extras["dropped_by_split"],
            "landmarks68": aligned.extras["landmarks68"],
        }
        if detector is not None:
            record["weights_source"] = detector.weights_source
        aligned.extras["alignment"] = record
        message(f"faces: {outcome_text(record['outcomes'])}")
        return aligned

    return prepare_cache(
        info,
        out=folder,
        size=size,
        options=options,
        alignment=alignment,
        before_build=align,
        workers=workers,
        progress=(lambda d, t: progress("warping", d, t)) if progress else None,
        message=message,
    )


def outcome_text(outcomes: dict[str, int]) -> str:
    """ "one face 120, dropped: no face 3" from an alignment record's ``outcomes``."""
    return ", ".join(f"{k} {v}" for k, v in outcomes.items())


def cache_alignment(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The alignment record of the cache in ``folder`` (None for a cache of the dataset's own crops)."""
    return read_cache_card(Path(folder)).get("alignment")


def aligned_dataset(info: DatasetInfo, **kwargs: Any) -> DatasetInfo:
    """:func:`prepare_aligned`, then the cache opened as a DatasetInfo."""
    return open_cache(prepare_aligned(info, **kwargs))


__all__ = [
    "DEFAULT_CACHE_SIZE",
    "LANDMARK_SOURCES",
    "SELECTIONS",
    "aligned_dataset",
    "alignment_parameters",
    "cache_alignment",
    "choose_face",
    "face_framing",
    "outcome_text",
    "locate_faces",
    "prepare_aligned",
]


def face_framing(info: DatasetInfo, *, split: str = "train") -> dict[str, Any] | None:
    """Where the faces a model trains on sit in its input: what ``predict`` aligns new faces onto.

    An aligned cache gives its template; a dataset of fixed-size crops with landmarks (SynthFER, a cache of the
    dataset's own crops) gives the median five points of its ``split`` faces, so a photo is framed like the training
    images. None when neither is known (then ``predict`` asks for ``--align``).
    """
    alignment = info.extras.get("alignment")
    if alignment:
        return {
            "alignment": alignment["template"],
            "template": alignment["template"],
            "size": int(alignment["size"]),
            "points": [[float(v) for v in p] for p in alignment["template_points"]],
            "source": f"the {alignment['template']} template",
        }
    size = info.extras.get("image_size")
    manifest = info.manifest
    if not size or "landmarks" not in manifest.columns:
        return None
    rows = manifest[manifest["split"] == split]
    points = [landmarks_array(v) for v in rows["landmarks"]]
    five = [five_from_68(p) if len(p) == 68 else p for p in points if p is not None and len(p) in (5, 68)]
    if not five:
        return None
    median = np.median(np.stack(five), axis=0)
    return {
        "alignment": None,
        "template": f"{info.name}_framing",
        "size": int(size),
        "points": [[round(float(v), 3) for v in p] for p in median],
        "source": f"the median five points of {len(five)} {split} faces of {info.name} (its own crops)",
    }
