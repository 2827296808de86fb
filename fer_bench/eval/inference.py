"""Running a model over a dataset: class probabilities (with optional flip TTA) and the head-metric hooks that
watch every batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fer_bench.data import DatasetInfo, FaceDataset
from fer_bench.errors import ConfigError
from fer_bench.eval.head_metrics import AttentionCosineHook, EvalHook, OcclusionDetectionHook
from fer_bench.models import FerModel
from fer_bench.runtime import autocast, autocast_dtype


@torch.no_grad()
def predict(
    model: FerModel,
    dataset: FaceDataset,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    workers: int = 0,
    tta: str | None = None,
    progress=None,
    hooks: list | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Class probabilities [N, K] (float64) of ``model`` on every item of ``dataset``, in order.

    ``tta="flip"`` averages the softmax of the image and its horizontal mirror. Each hook (see :class:`EvalHook`)
    sees every batch and the model's outputs, for head metrics (attention maps against AU masks, occlusion
    detection); ``batch["index"]`` is the row in ``dataset.rows``, so a hook can fetch per-sample maps and masks.
    ``precision`` ``bf16`` runs the forward under autocast where the device supports it (:mod:`fer_bench.runtime`);
    the default fp32 is what reported numbers use.
    """
    if tta not in (None, "none", "flip"):
        raise ConfigError(f"--tta: expected 'flip' or none, got {tta!r}")
    device = torch.device(device)
    amp_dtype = autocast_dtype(precision, device)
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs = []
    for batch in loader:
        images = batch["image"].to(device)  # [B, 3, S, S]
        with autocast(device, amp_dtype):
            outputs = model(images)
            flipped = model(images.flip(3))["logits"] if tta == "flip" else None
        p = torch.softmax(outputs["logits"].float(), dim=1)
        if flipped is not None:
            p = (p + torch.softmax(flipped.float(), dim=1)) / 2
        probs.append(p.cpu().numpy().astype(np.float64))
        for hook in hooks or ():
            hook.update(batch, outputs)
        if progress:
            progress(len(batch["label"]))
    return np.concatenate(probs) if probs else np.zeros((0, model.num_classes))


def head_metric_hooks(
    model: FerModel, info: DatasetInfo, rows: pd.DataFrame, label_names: tuple[str, ...]
) -> tuple[list[EvalHook], dict[str, Any]]:
    """The head-metric hooks that apply to ``model`` on ``info`` and the dataset options they need.

    * ATT-COS / CAM-COS whenever AU maps exist: SynthFER's rendered AU regions (``truth``), else the codebook drawn
      from 68 (or fitted 5) landmarks. A model without the ``au_heatmap`` head is probed with the head's default
      attention (channel mean of the last ViT block / second-to-last Swin stage), so both sides of an ablation are
      measured alike. Only for a model whose classes equal the dataset's.
    * Occluded-patch detection when the model has an ``occlusion`` head and the dataset has true masks (SynthFER).
    """
    hooks: list[EvalHook] = []
    options: dict[str, Any] = {}
    if not isinstance(model, FerModel) or tuple(label_names) != tuple(info.label_space.names):
        return hooks, options
    has_masks = "masks" in info.extras
    source = "truth" if has_masks and "au_intensity" in rows.columns else None
    if source is None and "landmarks" in rows.columns and len(rows):
        from fer_bench.data.manifest import landmarks_array

        first = landmarks_array(rows["landmarks"].iloc[0])
        source = "codebook" if first is not None and len(first) in (5, 68) else None
    if source is not None:
        kind, layer = model.probe_attention()
        hooks.append(AttentionCosineHook(tuple(label_names), map_source=source, attention=kind, layer=layer))
        options["heatmaps"] = source
    occlusion = model.head("occlusion")
    if occlusion is not None and has_masks:
        hooks.append(OcclusionDetectionHook(min_occupancy=occlusion.min_occupancy))
        options["occlusion_masks"] = True
    return hooks, options


def renormalize(probs: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (after masked columns were removed); an all-zero row becomes uniform."""
    total = probs.sum(axis=1, keepdims=True)
    return np.where(total > 0, probs / np.where(total > 0, total, 1), 1.0 / max(probs.shape[1], 1))
