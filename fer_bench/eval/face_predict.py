"""Expressions on any photo or video: detect faces, align them onto the model's framing, classify, and write a tidy
table (one row per face per image or frame) and annotated overlays.

The table's columns: ``source``, ``frame``, ``timestamp`` (seconds; empty for photos), ``face_id`` (the face's
rank in its image, or its track id in a video), ``x1 y1 x2 y2``, ``score`` (detection), the five landmarks
(``left_eye_x`` ...), ``face_px`` (the box's shorter side), ``sharpness`` (variance of the Laplacian of the aligned
grey crop), ``small``/``blurry`` flags, one ``p_<class>`` column per class, ``label``, ``confidence``, ``overlay``
(the annotated file's name with ``--overlay``: ``<stem>.overlay.jpg`` or ``.mp4``, never an input's name), and the
``model``, ``framing``, ``detector`` and ``detector_weights`` used. Faces too small or too blurred to trust are
flagged, never dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from fer_bench._io import atomic_path, atomic_write_bytes, is_utf8_name, shown_path
from fer_bench.data.dataset import decode_image
from fer_bench.data.device_augment import normalize
from fer_bench.errors import ConfigError, DataError
from fer_bench.faces import LANDMARK_NAMES, IoUTracker, umeyama, warp_faces
from fer_bench.faces.align import scale_points
from fer_bench.faces.detection import batched
from fer_bench.runtime import autocast, autocast_dtype

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MIN_FACE_PX = 32  # below this the crop is mostly upsampled blur: flagged "small"
MIN_SHARPNESS = 25.0  # variance of the Laplacian of the aligned grey crop; below it flagged "blurry"
MAX_PIXELS = 100_000_000  # a photo above 100 MP is refused before decoding: 12000x16000 took 10 GB and 80 s
OVERLAY_SUFFIX = ".overlay"  # overlays are <stem>.overlay.jpg / .mp4: never the name of an input


@dataclass
class Frame:
    """One picture to look at: a photo, or a video frame (``frame`` index, ``timestamp`` in seconds)."""

    source: str
    frame: int
    timestamp: float | None
    image: np.ndarray  # RGB uint8 [H, W, 3]


def image_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths`` (files, or folders searched for image suffixes, sorted).

    Raises:
        DataError: a path that does not exist, or a folder without images.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not is_utf8_name(path):
            raise DataError(f"{shown_path(path)}: the name is not valid UTF-8 (OpenCV cannot open it); rename it")
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            inside = [p for p in inside if not p.stem.endswith(OVERLAY_SUFFIX)]  # our own overlays from a past run
            for p in inside:
                if not is_utf8_name(p):
                    raise DataError(f"{shown_path(p)}: the file name is not valid UTF-8; rename the file")
            if not inside:
                raise DataError(f"{path}: a folder with no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found


def read_photo(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file (grey and alpha images converted); DataError naming it otherwise
    (also for a photo above MAX_PIXELS, refused from its header before any decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError:  # PIL's own limit (~179 MP) is above ours: the same answer
        width = height = MAX_PIXELS
    except Exception:  # not an image PIL knows, or a broken header: OpenCV has the last word below
        width = height = 0
    if width * height > MAX_PIXELS:
        size = (
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels"
            if width != MAX_PIXELS
            else "over 179 megapixels"
        )
        raise DataError(f"{path}: {size}, above the {MAX_PIXELS / 1e6:.0f}-MP limit for one photo; downscale it first")
    return decode_image(path)  # the dataset loaders' own decoder: the same errors, the same RGB conversion


def photo_frames(paths: Sequence[Path]) -> Iterator[Frame]:
    for path in paths:
        yield Frame(source=str(path), frame=0, timestamp=None, image=read_photo(path))


@dataclass
class VideoInfo:
    fps: float
    frames: int  # as the container reports it (may be an estimate)
    width: int
    height: int


def open_video(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
    """An opened OpenCV capture and the video's facts. DataError naming the file when it cannot be decoded."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a video file (or use --images for a folder of photos)")
    if not path.is_file():
        raise DataError(f"{shown_path(path)}: no such video file")
    if not is_utf8_name(path):
        raise DataError(f"{shown_path(path)}: the file name is not valid UTF-8 (OpenCV cannot open it); rename it")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"{path}: not a video OpenCV can open (unknown container or codec, or a corrupt file)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(
        fps=float(fps) if fps and math.isfinite(fps) and fps > 0 else 0.0,
        frames=int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
    )
    return capture, info


def video_frames(path: str | os.PathLike, *, every: int = 1) -> tuple[Iterator[Frame], VideoInfo]:
    """Every ``every``-th frame of a video with its index and timestamp (index / fps; the container's position when
    the frame rate is unknown). Raises DataError when not a single frame decodes."""
    capture, info = open_video(path)

    def frames() -> Iterator[Frame]:
        index = 0
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                if index % every == 0:
                    stamp = index / info.fps if info.fps else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    yield Frame(str(path), index, float(stamp), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                index += 1
        finally:
            capture.release()
        if index == 0:
            raise DataError(f"{path}: no frame could be decoded (corrupt video or unsupported codec)")

    return frames(), info


def model_framing(
    framing: dict[str, Any] | None, *, align: str | None, allow_mismatch: bool, checkpoint: str | os.PathLike
) -> dict[str, Any]:
    """The framing new faces are aligned onto: the checkpoint's own, or the template ``--align`` names (refused when
    it differs from the one the model was trained on, unless ``allow_mismatch``).

    Raises:
        ConfigError: a mismatched ``align``, or a checkpoint that records no framing and no ``align``.
    """
    from fer_bench.faces import get_template, list_templates

    if align is not None:
        template = get_template(align)
        if framing and framing.get("alignment") != align and not allow_mismatch:
            trained = framing.get("alignment") or f"its own framing ({framing.get('source')})"
            raise ConfigError(
                f"--align {align}: the model was trained on faces aligned to {trained}; drop --align to use that, "
                "or pass --allow-template-mismatch"
            )
        return {"alignment": align, "template": align, "size": template.size, "points": template.points}
    if framing is None:
        raise ConfigError(
            f"{checkpoint}: the checkpoint does not record how its training faces were framed (trained before "
            "fer_bench recorded it, or on a dataset without landmarks); give --align TEMPLATE "
            f"({', '.join(list_templates())})"
        )
    return framing


def framing_points(framing: dict[str, Any], size: int) -> np.ndarray:
    """The five points (float32 [5, 2]) a model's training faces sat on, scaled to a ``size`` crop (pixel centres
    scale about -0.5)."""
    return scale_points(np.asarray(framing["points"]).reshape(5, 2), from_size=float(framing["size"]), to_size=size)


def sharpness(crops: torch.Tensor) -> np.ndarray:
    """Variance of the Laplacian of the middle of each crop's grey image (uint8 [K, 3, S, S]): low on blurred faces.
    Only the central half is used: a face cut by the image border has black padding whose edge is sharp."""
    side = crops.shape[-1]
    middle = crops[..., side // 4 : side - side // 4, side // 4 : side - side // 4]
    grey = middle.float().mean(dim=1, keepdim=True)  # [K, 1, S/2, S/2]
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=grey.dtype, device=grey.device).view(1, 1, 3, 3)
    lap = torch.nn.functional.conv2d(grey, kernel)
    return lap.flatten(1).var(dim=1).cpu().numpy()


class FacePredictor:
    """Detector + alignment + classifier, batched: ``predictor(frames)`` returns one record per face.

    Args:
        model: A trained FerModel (in eval mode on ``device``).
        detector: A :class:`fer_bench.faces.FaceDetector` on ``device``.
        framing: The checkpoint's ``face_framing`` (template name, size, five points).
        img_size: The model's input side.
        label_names: The model's classes.
        track: Give faces track ids across consecutive frames (video) instead of per-image ranks.
    """

    def __init__(
        self,
        *,
        model,
        detector,
        framing: dict[str, Any],
        img_size: int,
        label_names: Sequence[str],
        device: torch.device,
        precision: str = "fp32",
        track: bool = False,
    ) -> None:
        self.model = model.eval()
        self.detector = detector
        self.framing = framing
        self.img_size = img_size
        self.label_names = list(label_names)
        self.device = device
        self.amp_dtype = autocast_dtype(precision, device)
        self.reference = torch.from_numpy(framing_points(framing, img_size))
        self.tracker = IoUTracker() if track else None

    @torch.no_grad()
    def __call__(self, frames: list[Frame]) -> list[dict[str, Any]]:
        """One record (a table row) per face found in ``frames``."""
        detections = self.detector.detect([f.image for f in frames])
        crops, owners = [], []
        # same-size frames (a video) are warped together on the device; photos one size at a time
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, frame in enumerate(frames):
            if len(detections[k]):
                by_shape.setdefault(frame.image.shape, []).append(k)
        for members in by_shape.values():
            images = torch.from_numpy(np.stack([frames[k].image for k in members])).to(self.device)
            images = images.permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
            points = np.concatenate([detections[k].landmarks for k in members])
            index = torch.tensor([i for i, k in enumerate(members) for _ in range(len(detections[k]))])
            matrices = umeyama(torch.from_numpy(points), self.reference)
            crops.append(warp_faces(images, matrices, index, self.img_size))
            owners.extend((k, j) for k in members for j in range(len(detections[k])))
        ids = [np.arange(len(d)) for d in detections]
        if self.tracker is not None:
            ids = [self.tracker.update(d.boxes) for d in detections]
        if not owners:
            return []
        batch = torch.cat(crops)  # [K, 3, S, S] uint8
        with autocast(self.device, self.amp_dtype):
            logits = self.model(normalize(batch.float()))["logits"]
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        sharp = sharpness(batch)
        records = []
        for (k, j), p, s in zip(owners, probs, sharp, strict=True):
            frame, faces = frames[k], detections[k]
            box = faces.boxes[j]
            side = float(min(box[2] - box[0], box[3] - box[1]))
            record: dict[str, Any] = {
                "source": frame.source,
                "frame": frame.frame,
                "timestamp": frame.timestamp,
                "face_id": int(ids[k][j]),
                "x1": float(box[0]),
                "y1": float(box[1]),
                "x2": float(box[2]),
                "y2": float(box[3]),
                "score": float(faces.scores[j]),
            }
            for name, (x, y) in zip(LANDMARK_NAMES, faces.landmarks[j], strict=True):
                record[f"{name}_x"], record[f"{name}_y"] = float(x), float(y)
            record.update(face_px=side, sharpness=float(s), small=side < MIN_FACE_PX, blurry=float(s) < MIN_SHARPNESS)
            record.update({f"p_{name}": float(v) for name, v in zip(self.label_names, p, strict=True)})
            record["label"] = self.label_names[int(p.argmax())]
            record["confidence"] = float(p.max())
            records.append(record)
        return records


@dataclass
class MediaResult:
    records: list[dict[str, Any]]  # one per face
    no_face: list[str]  # the photos (or "frame N") where no face was found
    frames_seen: int


def predict_media(
    predictor: FacePredictor,
    frames: Iterator[Frame],
    *,
    batch_size: int,
    overlay: Path | None = None,
    video: Path | None = None,
    video_facts: VideoInfo | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MediaResult:
    """Run ``predictor`` over ``frames`` in batches; write overlays (one JPEG per photo into ``overlay``, or one
    annotated MP4 of ``video``). ``progress(frames_in_batch, faces_so_far)`` after each batch.

    Raises:
        DataError: not a single face in any frame (names the first sources), or an unreadable input.
    """
    records: list[dict[str, Any]] = []
    no_face: list[str] = []
    frames_seen = 0
    used: set[str] = set()
    writer = None
    if overlay is not None and video is not None and video_facts is not None:
        writer = VideoOverlay(overlay / f"{video.stem}{OVERLAY_SUFFIX}.mp4", fps=video_facts.fps)
    try:
        for batch in batched(frames, batch_size):
            found = predictor(batch)
            records.extend(found)
            by_frame: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for record in found:
                by_frame.setdefault((record["source"], record["frame"]), []).append(record)
            for frame in batch:
                mine = by_frame.get((frame.source, frame.frame), [])
                if not mine:
                    no_face.append(frame.source if video is None else f"frame {frame.frame}")
                if writer is not None:
                    writer.write(draw_overlay(frame.image, mine, predictor.label_names))
                    name = writer.path.name
                elif overlay is not None:
                    name = f"{Path(frame.source).stem}{OVERLAY_SUFFIX}.jpg"
                    while name in used:  # photos with the same name from different folders
                        name = name.replace(f"{OVERLAY_SUFFIX}.jpg", f"_{OVERLAY_SUFFIX}.jpg")
                    used.add(name)
                    write_image(overlay / name, draw_overlay(frame.image, mine, predictor.label_names))
                for record in mine:
                    record["overlay"] = name if overlay is not None else ""
            frames_seen += len(batch)
            if progress:
                progress(len(batch), len(records))
        if not records:
            where = str(video) if video is not None else ", ".join(no_face[:3]) + (", ..." if len(no_face) > 3 else "")
            raise DataError(
                f"no face found in {where} by {predictor.detector.name}; faces under ~20 px or in profile may be missed"
            )
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if writer is not None:
        writer.close()
    return MediaResult(records=records, no_face=no_face, frames_seen=frames_seen)


def check_table_path(out: Path) -> None:
    """ConfigError unless ``out`` can name the predictions table (checked before any work is done)."""
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"--out {out}: expected a .csv or .parquet file name")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as {out / 'faces.csv'}")


def write_table(records: list[dict[str, Any]], out: str | os.PathLike, *, extra: dict[str, str]) -> pd.DataFrame:
    """Write the predictions table to ``out`` (``.csv`` or ``.parquet``, atomically) with the ``extra`` columns
    (model, framing, detector...) repeated on every row; returns it."""
    out = Path(out)
    check_table_path(out)
    table = pd.DataFrame.from_records(records)
    for key, value in extra.items():
        table[key] = value
    _check_parent(out)
    try:
        with atomic_path(out) as tmp:
            if out.suffix.lower() == ".csv":
                table.to_csv(tmp, index=False, float_format="%.6g")
            else:
                table.to_parquet(tmp, index=False)
    except OSError as exc:
        raise DataError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Overlays

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]  # fmt: skip


def draw_overlay(image: np.ndarray, records: list[dict[str, Any]], label_names: Sequence[str]) -> np.ndarray:
    """``image`` (RGB) with, per face: its box and five landmarks, the predicted label and confidence, and a bar per
    class; flagged faces (small, blurry) are drawn dashed-grey and say so."""
    canvas = image.copy()
    height, width = canvas.shape[:2]
    unit = max(1.0, min(height, width) / 480)
    thick = max(1, round(2 * unit))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for record in records:
        x1, y1, x2, y2 = (int(round(record[k])) for k in ("x1", "y1", "x2", "y2"))
        best = label_names.index(record["label"])
        colour = _COLOURS[best % len(_COLOURS)]
        flagged = record["small"] or record["blurry"]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (160, 160, 160) if flagged else colour, thick)
        for name in LANDMARK_NAMES:
            centre = (int(round(record[f"{name}_x"])), int(round(record[f"{name}_y"])))
            cv2.circle(canvas, centre, max(1, thick), (255, 255, 255), -1)
        title = f"#{record['face_id']} {record['label']} {record['confidence']:.2f}"
        if flagged:
            title += " (" + ", ".join(f for f in ("small", "blurry") if record[f]) + ")"
        scale = 0.5 * unit
        (tw, th), _ = cv2.getTextSize(title, font, scale, thick)
        ty = max(th + 4, y1 - 4)
        cv2.rectangle(canvas, (x1, ty - th - 4), (x1 + tw + 4, ty + 2), colour, -1)
        cv2.putText(canvas, title, (x1 + 2, ty - 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        # one bar per class beside the box (inside the picture)
        bar_w, bar_h = int(70 * unit), max(6, int(11 * unit))
        bx = x2 + 6 if x2 + 6 + bar_w + int(60 * unit) < width else max(0, x1 - bar_w - int(66 * unit))
        for c, name in enumerate(label_names):
            by = y1 + c * (bar_h + 3)
            if by + bar_h >= height:
                break
            p = record[f"p_{name}"]
            cv2.rectangle(canvas, (bx, by), (bx + bar_w, by + bar_h), (40, 40, 40), -1)
            cv2.rectangle(canvas, (bx, by), (bx + int(bar_w * p), by + bar_h), _COLOURS[c % len(_COLOURS)], -1)
            cv2.putText(canvas, name[:10], (bx + bar_w + 3, by + bar_h - 1), font, 0.35 * unit, (255, 255, 255), 1,
                        cv2.LINE_AA)  # fmt: skip
    return canvas


def _check_parent(path: Path) -> None:
    """A clear error when some folder on ``path``'s way is a file (mkdir would only say "File exists")."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{path}: cannot be written, {parent} is a file, not a folder")
            return


def write_image(path: Path, image: np.ndarray) -> None:
    """Write an RGB image atomically (the format from the suffix)."""
    _check_parent(path)
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"{path}: OpenCV cannot encode a {path.suffix} image")
    try:
        atomic_write_bytes(path, encoded.tobytes())
    except OSError as exc:
        raise DataError(f"{path}: cannot be written ({exc.strerror or exc})") from None


class VideoOverlay:
    """An annotated copy of a video (mp4v in .mp4), written to a hidden file and renamed when closed. The writer
    opens on the first frame, at that frame's size (a container's reported size can be wrong or odd)."""

    def __init__(self, path: Path, *, fps: float) -> None:
        _check_parent(path)
        if not is_utf8_name(path):
            raise DataError(f"{shown_path(path)}: the name is not valid UTF-8 (OpenCV cannot write it); choose another")
        self.path = path
        self.fps = fps or 25.0
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer: cv2.VideoWriter | None = None

    def write(self, image: np.ndarray) -> None:
        if self.writer is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"{self.path.parent}: cannot be created ({exc.strerror or exc})") from None
            height, width = image.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self.writer.isOpened():
                raise DataError(f"{self.path}: OpenCV cannot write this video (codec mp4v)")
        self.writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Stop writing and remove the partial file (the run failed: no half video under the final name)."""
        if self.writer is not None:
            self.writer.release()
        self.tmp.unlink(missing_ok=True)


def alignment_mismatch(framing: dict[str, Any] | None, data_alignment: dict[str, Any] | None) -> str | None:
    """Why a model's training faces and a dataset's faces are framed differently (one line), or None when they agree.

    ``framing`` is the checkpoint's ``face_framing`` (its ``alignment`` is a template name, or None for the dataset's
    own crops); ``data_alignment`` is the cache's alignment record (None for the dataset's own crops).
    """
    trained = (framing or {}).get("alignment")
    given = (data_alignment or {}).get("template")
    if trained == given:
        return None
    describe = lambda name: f"faces aligned to {name}" if name else "the dataset's own crops"  # noqa: E731
    return f"the model was trained on {describe(trained)}, these are {describe(given)}"
