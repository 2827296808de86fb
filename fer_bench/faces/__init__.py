"""Faces: batched detection (RetinaFace, MTCNN), five-point alignment onto named templates, and video tracks.

Depends only on fer_bench's base modules; ``fer_bench.data`` and ``fer_bench.eval`` use it, models never do.
"""

from fer_bench.faces.align import (
    alignment_matrices,
    fit_68_from_5,
    five_from_68,
    get_template,
    list_templates,
    transform_points,
    umeyama,
    warp_faces,
    warp_image,
)
from fer_bench.faces.detection import LANDMARK_NAMES, FaceDetector, Faces, create_detector, list_detectors
from fer_bench.faces.track import IoUTracker

__all__ = [
    "LANDMARK_NAMES",
    "FaceDetector",
    "Faces",
    "IoUTracker",
    "alignment_matrices",
    "create_detector",
    "fit_68_from_5",
    "five_from_68",
    "get_template",
    "list_detectors",
    "list_templates",
    "transform_points",
    "umeyama",
    "warp_faces",
    "warp_image",
]
