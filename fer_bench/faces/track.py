"""Face tracks across video frames: greedy IoU association, so each face keeps one id while it is in view."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou


class IoUTracker:
    """Gives each detection in a frame a track id, continuing the track whose last box overlaps it most.

    Per frame, pairs (track, detection) are taken greedily by decreasing IoU, each at most once, when IoU >=
    ``min_iou``; unmatched detections start new tracks (ids 0, 1, 2, ... in order of appearance); a track unseen for
    more than ``max_missed`` frames is closed and its id never reused.

    Example:
        >>> tracker = IoUTracker()
        >>> tracker.update(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)).tolist()
        [0, 1]
        >>> tracker.update(np.array([[51, 50, 61, 60], [1, 0, 11, 10]], np.float32)).tolist()
        [1, 0]
    """

    def __init__(self, *, min_iou: float = 0.3, max_missed: int = 5) -> None:
        self.min_iou = min_iou
        self.max_missed = max_missed
        self.boxes = np.zeros((0, 4), np.float32)  # last box of each open track
        self.ids = np.zeros((0,), np.int64)
        self.missed = np.zeros((0,), np.int64)
        self.next_id = 0

    def update(self, boxes: np.ndarray) -> np.ndarray:
        """Track ids (int64 [k]) for this frame's ``boxes`` [k, 4] (x1, y1, x2, y2)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        assigned = np.full(len(boxes), -1, np.int64)
        matched_tracks = np.zeros(len(self.ids), bool)
        if len(boxes) and len(self.ids):
            iou = box_iou(torch.from_numpy(self.boxes), torch.from_numpy(boxes)).numpy()  # [tracks, detections]
            for flat in np.argsort(-iou, axis=None, kind="stable"):
                t, d = np.unravel_index(flat, iou.shape)
                if iou[t, d] < self.min_iou:
                    break
                if matched_tracks[t] or assigned[d] >= 0:
                    continue
                matched_tracks[t] = True
                assigned[d] = self.ids[t]
                self.boxes[t] = boxes[d]
        self.missed = np.where(matched_tracks, 0, self.missed + 1)
        keep = self.missed <= self.max_missed
        self.boxes, self.ids, self.missed = self.boxes[keep], self.ids[keep], self.missed[keep]
        new = np.nonzero(assigned < 0)[0]
        if len(new):
            fresh = np.arange(self.next_id, self.next_id + len(new), dtype=np.int64)
            self.next_id += len(new)
            assigned[new] = fresh
            self.boxes = np.concatenate([self.boxes, boxes[new]])
            self.ids = np.concatenate([self.ids, fresh])
            self.missed = np.concatenate([self.missed, np.zeros(len(new), np.int64)])
        return assigned
