"""Faces throughput: detection + alignment + classification, images/s on 640x480 photos and frames/s on a 720p video.

Each stage is timed on its own, in this process, so the figure says what bounds the pipeline: decoding (JPEG
photos, or OpenCV's video decoder), detection, alignment (the batched warp), or classification. Faces per second are
reported beside frames per second, with Py-Feat's published 38-270 frames/s for scale (faces.md; measured on other
hardware, other models: not a like-for-like comparison).

CPU (default): MTCNN (the released weights, read out of facenet-pytorch's wheel) and the quickstart model
(``--checkpoint runs/quickstart-*/best.pt``; without one, the quickstart architecture with random weights: the speed
does not depend on the weights). GPU (``--device cuda``): RetinaFace ResNet-50 (``--detector-weights`` or random
weights; speed again independent of them) and ViT-B/16 at 224 px, bf16.

The photos are grace_hopper.jpg (matplotlib's sample data) placed at varying positions and scales on 640x480
canvases; the video is 720p with one face moving across it, written here with OpenCV (mp4v).

    python benchmarks/faces_speed.py [--device cpu|cuda] [--checkpoint PATH] [--detector mtcnn|retinaface]
        [--detector-weights PATH] [--photos 32] [--frames 90] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fer_bench.data.device_augment import normalize  # noqa: E402
from fer_bench.eval.face_predict import FacePredictor, batched, photo_frames, read_photo, video_frames  # noqa: E402
from fer_bench.faces import create_detector, umeyama, warp_faces  # noqa: E402
from fer_bench.runtime import autocast, autocast_dtype  # noqa: E402

PYFEAT_FPS = (38, 270)
# where the five points go in the crop, as fractions of its side (an ArcFace-like framing; speed does not depend on it)
FRAMING = np.array([[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]])


def _photo() -> np.ndarray:
    import matplotlib.cbook

    return read_photo(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))


def make_photos(folder: Path, count: int) -> list[Path]:
    """``count`` 640x480 JPEGs, each with the face at another place and scale."""
    face = _photo()
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        canvas = np.full((480, 640, 3), 110, np.uint8)
        side = int(rng.integers(200, 400))
        small = cv2.resize(face, (side, int(side * face.shape[0] / face.shape[1])), interpolation=cv2.INTER_AREA)
        y, x = int(rng.integers(0, 480 - min(small.shape[0], 480) + 1)), int(rng.integers(0, 640 - side + 1))
        h = min(small.shape[0], 480 - y)
        canvas[y : y + h, x : x + side] = small[:h]
        path = folder / f"photo{k:03d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def make_video(path: Path, frames: int, fps: float = 30.0) -> Path:
    face = cv2.resize(_photo(), (300, 256), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (1280, 720))
    for k in range(frames):
        canvas = np.full((720, 1280, 3), 100, np.uint8)
        x = 100 + int(800 * k / max(1, frames - 1))
        canvas[200:456, x : x + 300] = face
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def load_model(checkpoint: str | None, device: torch.device, big: bool):
    from fer_bench.models import create_model
    from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint

    if checkpoint:
        state = load_checkpoint(checkpoint)
        return model_from_checkpoint(state).to(device).eval(), int(state["model_config"]["img_size"]), checkpoint
    if big:
        return create_model("vit_base_patch16_224", num_classes=8, img_size=224).to(device).eval(), 224, "ViT-B/16"
    model = create_model("vit_tiny_patch16_224", num_classes=8, img_size=64, stem="conv", init_values=1e-4, depth=2)
    return model.to(device).eval(), 64, "quickstart architecture (random weights)"


def make_detector(name: str, weights: str | None, device: torch.device):
    if name == "retinaface" and weights is None:
        from fer_bench.faces.retinaface import RetinaFaceDetector, RetinaFaceNet

        return RetinaFaceDetector.from_state_dict(RetinaFaceNet().state_dict(), device=device, score_threshold=0.99)
    if name == "mtcnn" and weights is None and not os.environ.get("FER_BENCH_WEIGHTS_DIR"):
        found = sorted((REPO / ".weights").glob("facenet_pytorch-*.whl"))  # where the tests fetched it
        weights = str(found[0]) if found else None
    return create_detector(name, weights=weights, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_times(frames: list[np.ndarray], detector, model, img_size: int, device, batch: int) -> dict[str, float]:
    """Seconds per stage over ``frames``: detection, alignment (warp), classification (forward)."""
    times = {"detect": 0.0, "align": 0.0, "classify": 0.0}
    reference = torch.from_numpy(
        np.array([[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]]) * img_size
    )
    amp = autocast_dtype("bf16" if device.type == "cuda" else "fp32", device)
    faces_total = 0
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        t0 = time.perf_counter()
        found = detector.detect(chunk)
        _sync(device)
        t1 = time.perf_counter()
        members = [k for k, f in enumerate(found) if len(f)]
        if not members:
            times["detect"] += t1 - t0
            continue
        images = torch.from_numpy(np.stack([chunk[k] for k in members])).to(device).permute(0, 3, 1, 2)
        points = np.concatenate([found[k].landmarks for k in members])
        index = torch.tensor([i for i, k in enumerate(members) for _ in range(len(found[k]))])
        crops = warp_faces(images, umeyama(torch.from_numpy(points), reference), index, img_size)
        _sync(device)
        t2 = time.perf_counter()
        with torch.no_grad(), autocast(device, amp):
            model(normalize(crops.float()))["logits"].float().cpu()
        t3 = time.perf_counter()
        faces_total += len(points)
        times["detect"] += t1 - t0
        times["align"] += t2 - t1
        times["classify"] += t3 - t2
    times["faces"] = faces_total
    return times


def report(title: str, count: int, decode_s: float, times: dict[str, float], end_to_end_s: float, unit: str) -> None:
    print(f"\n{title}: {count} {unit}, {int(times['faces'])} faces")
    stages = {"decode": decode_s, **{k: v for k, v in times.items() if k != "faces"}}
    total = sum(stages.values())
    for name, seconds in stages.items():
        rate = count / seconds if seconds else float("inf")
        print(f"  {name:9s} {seconds:7.2f} s  {rate:8.1f} {unit}/s  {100 * seconds / total:5.1f} % of the stages")
    bound = max(stages, key=stages.get)
    rate = count / end_to_end_s
    print(f"  end to end (FacePredictor, decode included): {rate:.1f} {unit}/s, "
          f"{times['faces'] / end_to_end_s:.1f} face-{unit}/s; bounded by {bound}")  # fmt: skip
    print(f"  Py-Feat (published, other hardware): {PYFEAT_FPS[0]}-{PYFEAT_FPS[1]} frames/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint")
    parser.add_argument("--detector")
    parser.add_argument("--detector-weights")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    gpu = device.type == "cuda"
    detector = make_detector(args.detector or ("retinaface" if gpu else "mtcnn"), args.detector_weights, device)
    model, img_size, model_name = load_model(args.checkpoint, device, big=gpu and not args.checkpoint)
    print(f"device {device}; detector {detector.name}; model {model_name} at {img_size} px; batch {args.batch}")
    framing = {"size": img_size, "points": (FRAMING * img_size).tolist(), "template": "bench"}
    label_names = [f"c{k}" for k in range(model.num_classes)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.photos)
        warm = [read_photo(p) for p in paths[: args.batch]]
        stage_times(warm, detector, model, img_size, device, args.batch)  # warm-up (allocations, cuDNN choice)
        t0 = time.perf_counter()
        photos = [read_photo(p) for p in paths]
        decode_s = time.perf_counter() - t0
        times = stage_times(photos, detector, model, img_size, device, args.batch)
        predictor = FacePredictor(model=model, detector=detector, framing=framing, img_size=img_size,
                                  label_names=label_names, device=device)  # fmt: skip
        t0 = time.perf_counter()
        for chunk in batched(photo_frames(paths), args.batch):
            predictor(chunk)
        _sync(device)
        report("640x480 photos", len(paths), decode_s, times, time.perf_counter() - t0, "images")

        video = make_video(Path(tmp) / "clip.mp4", args.frames)
        t0 = time.perf_counter()
        frames_iter, _ = video_frames(video)
        frames = [f.image for f in frames_iter]
        decode_s = time.perf_counter() - t0
        times = stage_times(frames, detector, model, img_size, device, args.batch)
        predictor = FacePredictor(model=model, detector=detector, framing=framing, img_size=img_size,
                                  label_names=label_names, device=device, track=True)  # fmt: skip
        t0 = time.perf_counter()
        frames_iter, _ = video_frames(video)
        for chunk in batched(frames_iter, args.batch):
            predictor(chunk)
        _sync(device)
        report("720p video", len(frames), decode_s, times, time.perf_counter() - t0, "frames")


if __name__ == "__main__":
    main()
