"""The evaluator: run a model under a protocol (or on a split) and score it, clean and perturbed, with head metrics.

The pieces, one job each: :mod:`fer_bench.eval.inference` runs the model, :mod:`fer_bench.eval.results` turns
predictions into the results dict, :mod:`fer_bench.eval.report` writes ``results.json``, ``report.md`` and the plots
(:mod:`fer_bench.eval.plots`); submissions are scored in :mod:`fer_bench.eval.submission`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fer_bench.data import DatasetInfo, FaceDataset, create_transform
from fer_bench.eval.head_metrics import OcclusionDetectionHook
from fer_bench.eval.inference import head_metric_hooks, predict, renormalize
from fer_bench.eval.protocols import Protocol, protocol_rows
from fer_bench.eval.results import HEADLINE, PER_IMAGE, align_rows, score
from fer_bench.models import FerModel


def evaluate(
    model: FerModel,
    info: DatasetInfo,
    *,
    split: str | None = None,
    img_size: int,
    label_names: tuple[str, ...],
    protocol: Protocol | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    workers: int = 0,
    tta: str | None = None,
    perturb: str | None = None,
    perturb_seed: int = 0,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
    progress=None,
    hooks: list | None = None,
    head_metrics: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run ``model`` on the protocol's rows (or ``split`` of ``info``) and return the results dict.

    ``label_names`` are the model's classes. When they differ from the dataset's, scoring goes through the
    canonical names (:func:`label_alignment`): a 7-class model on an 8-class dataset drops the contempt rows, an
    8-class model on a 7-class dataset has its contempt logit masked; ``cross_dataset`` in the result says which.
    With ``perturb``, the clean score is computed too and the drop reported under ``robustness``.
    With ``head_metrics``, ATT-COS/CAM-COS (datasets with AU maps: SynthFER's rendered regions, or landmarks) and
    occluded-patch detection (an occlusion head on a dataset with true masks) land under ``heads``.
    """
    if protocol is not None:
        split = protocol.split
        rows = protocol_rows(protocol, info)
    else:
        split = split or "test"
        rows = info.split(split)
    rows, scored, cross = align_rows(rows, info, tuple(label_names))
    transform = create_transform(train=False, img_size=img_size)
    probe = getattr(model, "attention_probe", None)  # head_metric_hooks may set one; put the caller's back after
    auto_hooks, data_options = head_metric_hooks(model, info, rows, label_names) if head_metrics else ([], {})
    hooks = list(hooks or []) + auto_hooks

    def run(kind: str | None, run_hooks: list, options: dict[str, Any]) -> dict[str, Any]:
        """Scored results of one pass (clean, or under perturbation ``kind``) with its hooks' head metrics."""
        dataset = FaceDataset.from_info(
            info,
            split,
            transform=transform,
            rows=rows,
            perturb=kind,
            perturb_seed=perturb_seed,
            **options,
        )
        try:
            probs = predict(
                model,
                dataset,
                batch_size=batch_size,
                device=device,
                workers=workers,
                tta=tta,
                progress=progress,
                hooks=run_hooks,
                precision=precision,
            )
        finally:
            if isinstance(model, FerModel):
                model.attention_probe = probe
        probs = renormalize(probs[:, [list(label_names).index(n) for n in scored]])  # masked logits: columns left out
        results = score(probs=probs, **common)
        results["heads"] = {hook.name: hook.result() for hook in run_hooks}
        for hook in run_hooks:  # per-image head values (ATT-COS) beside the per-image predictions
            per_image = getattr(hook, "per_image", None)
            for column, values in (per_image(len(rows)) if per_image else {}).items():
                results[PER_IMAGE].setdefault(column, np.asarray(values, dtype=np.float64).tolist())
        return results

    config = {
        "img_size": img_size,
        "test_time": "resize to img_size",
        "tta": tta or "none",
        "perturb": perturb,
        "perturb_seed": perturb_seed if perturb else None,
        "precision": precision,
        "min_group_size": min_group_size,
        "heads": model.head_config() if isinstance(model, FerModel) else {},
    }
    common = dict(
        info=info,
        rows=rows,
        scored=scored,
        protocol=protocol,
        split=split,
        cross=cross,
        config=config,
        n_bootstrap=n_bootstrap,
        seed=seed,
        min_group_size=min_group_size,
    )
    clean = run(None, hooks, data_options)
    if not perturb:
        return clean
    # the head metrics again, on the perturbed images (fresh hooks: they accumulate); the occlusion perturbation's
    # added occluders have no true mask, so occluded-patch detection is not scored under it
    again, again_options = head_metric_hooks(model, info, rows, label_names) if head_metrics else ([], {})
    if perturb == "occlusion":
        again = [h for h in again if not isinstance(h, OcclusionDetectionHook)]
        again_options.pop("occlusion_masks", None)
    perturbed = run(perturb, again, again_options)
    perturbed["robustness"] = {
        "perturbation": perturb,
        "seed": perturb_seed,
        "clean": {k: clean["metrics"][k] for k in HEADLINE},
        "drop": {k: clean["metrics"][k] - perturbed["metrics"][k] for k in HEADLINE},
        "clean_heads": clean["heads"],
    }
    return perturbed
