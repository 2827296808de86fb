"""Metrics of the heads' claims, computed while the evaluator predicts: attention against AU maps (ATT-COS, CAM-COS)
and occluded-patch detection (precision, recall, F1, IoU). Hooks see every batch (:class:`EvalHook`)."""

from __future__ import annotations

import abc

import numpy as np
import torch
import torch.nn.functional as F


class EvalHook(abc.ABC):
    """A per-batch metric that lands in the evaluation report under ``heads/<name>``.

    Subclasses accumulate in :meth:`update` (called with the batch dict and the model's output dict, e.g. an
    ``attention`` map [B, H, W] next to ``logits``) and return a flat dict of numbers from :meth:`result`.
    """

    name = "hook"

    @abc.abstractmethod
    def update(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Accumulate one batch."""

    @abc.abstractmethod
    def result(self) -> dict[str, float]:
        """The metric over every batch seen."""

    def per_image(self, n: int) -> dict[str, np.ndarray]:
        """Per-image values (column -> [n] array, NaN where the image gave none) over the ``n`` rows evaluated,
        indexed by ``batch["index"]``; none by default."""
        return {}


def map_cosine(maps: torch.Tensor, targets: torch.Tensor, *, normalise: str = "shift") -> torch.Tensor:
    """Per-sample cosine between low-resolution maps [B, h, w] and target maps [B, H, W] (Belharbi et al., FG 2024,
    ``inference_wsol.py``): the map is bilinearly upsampled to the target size and clamped to its own min/max; then
    ``shift`` (attention) moves it to be non-negative when its minimum is below 0, ``minmax`` (CAM) scales it to
    [0, 1]. NaN (a constant map) counts as 0.

    cos(a, m) = Σ a·m / (‖a‖ ‖m‖)

    Example:
        >>> m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]); a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> round(float(map_cosine(m, m)[0]), 3), round(float(map_cosine(a, m)[0]), 3)
        (1.0, 0.707)
    """
    maps = maps.float()
    low = maps.flatten(1).amin(dim=1).view(-1, 1, 1)
    high = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    up = F.interpolate(maps.unsqueeze(1), size=targets.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    up = torch.maximum(torch.minimum(up, high), low)
    # attention: shift a map with negative values up; CAM: scale to [0, 1]
    up = (up - low) / (high - low).clamp_min(1e-12) if normalise == "minmax" else up - torch.clamp(low, max=0.0)
    cos = F.cosine_similarity(up.flatten(1), targets.float().flatten(1), dim=1, eps=1e-12)
    return torch.nan_to_num(cos, nan=0.0)


class AttentionCosineHook(EvalHook):
    """ATT-COS and CAM-COS: per ground-truth class, the mean cosine between the model's attention (or the CAM of
    the true class) and the sample's AU map; the headline is the mean over classes that have maps (the paper's
    non-neutral classes). Reads ``attention`` and ``cam`` from the outputs, ``heatmap``/``heatmap_valid`` from the
    batch."""

    name = "au_attention"

    def __init__(self, label_names: tuple[str, ...], *, map_source: str, attention: str, layer: int) -> None:
        self.label_names = tuple(label_names)
        self.map_source, self.attention, self.layer = map_source, attention, layer
        k = len(label_names)
        self.att_sum, self.cam_sum, self.count = np.zeros(k), np.zeros(k), np.zeros(k, dtype=np.int64)
        self.att_by_index: dict[int, float] = {}  # row index -> ATT-COS of that image

    def update(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        valid = batch["heatmap_valid"].bool()
        if not bool(valid.any()) or "attention" not in outputs:
            return
        heatmaps = batch["heatmap"][valid]
        labels = batch["label"][valid]
        att = map_cosine(outputs["attention"].detach().cpu()[valid], heatmaps)
        cams = outputs["cam"].detach().cpu()[valid]
        cam = map_cosine(cams[torch.arange(len(labels)), labels], heatmaps, normalise="minmax")
        indices = batch["index"][valid].tolist() if "index" in batch else [None] * len(labels)
        for index, label, a, c in zip(indices, labels.tolist(), att.tolist(), cam.tolist(), strict=True):
            self.att_sum[label] += a
            self.cam_sum[label] += c
            self.count[label] += 1
            if index is not None:
                self.att_by_index[int(index)] = a

    def per_image(self, n: int) -> dict[str, np.ndarray]:
        """``att_cos`` of every image with an AU map (NaN elsewhere)."""
        values = np.full(n, np.nan)
        for index, value in self.att_by_index.items():
            if 0 <= index < n:
                values[index] = value
        return {"att_cos": values}

    def result(self) -> dict[str, float | int | str]:
        has = self.count > 0
        out: dict[str, float | int | str] = {
            "att_cos": float(np.mean(self.att_sum[has] / self.count[has])) if has.any() else float("nan"),
            "cam_cos": float(np.mean(self.cam_sum[has] / self.count[has])) if has.any() else float("nan"),
            "n_maps": int(self.count.sum()),
            # what was measured, so that two ATT-COS figures are only compared when these agree
            "attention": self.attention,
            "layer": int(self.layer),
            "map_source": self.map_source,
        }
        for k in np.flatnonzero(has):
            out[f"att_cos/{self.label_names[k]}"] = float(self.att_sum[k] / self.count[k])
            out[f"cam_cos/{self.label_names[k]}"] = float(self.cam_sum[k] / self.count[k])
        return out


def detection_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2PR/(P+R) and IoU TP/(TP+FP+FN) of flagged patches
    (NaN where a denominator is 0).

    Example:
        >>> detection_scores(6, 2, 2)
        {'precision': 0.75, 'recall': 0.75, 'f1': 0.75, 'iou': 0.6}
    """
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    iou = tp / (tp + fp + fn) if tp + fp + fn else nan
    return {"precision": precision, "recall": recall, "f1": f1, "iou": iou}


class OcclusionDetectionHook(EvalHook):
    """Patch-level detection of the occlusion head against true occlusion masks: a patch is truly occluded when at
    least ``min_occupancy`` of its pixels are."""

    name = "occlusion_detection"

    def __init__(self, *, min_occupancy: float) -> None:
        self.min_occupancy = min_occupancy
        self.tp = self.fp = self.fn = self.tn = 0

    def update(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        if "occlusion_flags" not in outputs or "occlusion" not in batch:
            return
        flags = outputs["occlusion_flags"].detach().cpu()
        occupancy = F.adaptive_avg_pool2d(batch["occlusion"].float().unsqueeze(1), flags.shape[-2:]).squeeze(1)
        truth = occupancy >= self.min_occupancy
        self.tp += int((flags & truth).sum())
        self.fp += int((flags & ~truth).sum())
        self.fn += int((~flags & truth).sum())
        self.tn += int((~flags & ~truth).sum())

    def result(self) -> dict[str, float]:
        total = self.tp + self.fp + self.fn + self.tn
        return {
            **detection_scores(self.tp, self.fp, self.fn),
            "patch_acc": (self.tp + self.tn) / total if total else float("nan"),
            "patches": total,
            "occluded_patches": self.tp + self.fn,
        }
