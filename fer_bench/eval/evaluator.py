"""The evaluator: score predictions under a protocol and write ``results.json``, ``report.md`` and plots.

Metrics come from :mod:`fer_bench.eval.metrics`, confidence intervals from :mod:`fer_bench.eval.bootstrap` and
bias figures from :mod:`fer_bench.eval.fairness`; this module gathers, reports and flattens them for MLflow.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fer_bench import __version__
from fer_bench._io import atomic_path, atomic_write_text
from fer_bench.data import DatasetInfo, FaceDataset, create_transform, dataset_hash, get_label_space
from fer_bench.data.labels import list_label_spaces
from fer_bench.errors import ConfigError
from fer_bench.eval import bootstrap as B
from fer_bench.eval import fairness as F
from fer_bench.eval import metrics as M
from fer_bench.eval.head_metrics import AttentionCosineHook, EvalHook, OcclusionDetectionHook
from fer_bench.eval.protocols import Protocol, protocol_rows
from fer_bench.models import FerModel
from fer_bench.provenance import git_sha
from fer_bench.runtime import autocast, autocast_dtype

RESULTS_SCHEMA_VERSION = 2
HEADLINE = {"acc": M.accuracy_from_cm, "mean_class_acc": M.mean_class_accuracy_from_cm, "macro_f1": M.macro_f1_from_cm}
FAIRNESS_KEYS = (
    "worst_group_acc",
    "max_gap",
    "min_max_ratio",
    "fair_f1",
    "dem_parity_gap",
    "eq_opp_gap",
    "eq_odds_gap",
    "overall_disparity",
)


# ---------------------------------------------------------------------------------------------------------------------
# Predictions


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


def label_alignment(model_names: tuple[str, ...], dataset_names: tuple[str, ...]) -> dict[str, Any]:
    """How a model's classes meet a dataset's: the shared classes (in dataset order) are scored; model classes the
    dataset lacks have their logits masked; dataset rows of classes the model lacks are dropped.

    Example:
        >>> a = label_alignment(("neutral", "anger", "contempt"), ("neutral", "anger"))
        >>> a["scored"], a["masked_logits"], a["dropped_classes"]
        (['neutral', 'anger'], ['contempt'], [])
    """
    scored = [n for n in dataset_names if n in model_names]
    if not scored:
        raise ConfigError(
            f"the model predicts {list(model_names)} and the dataset uses {list(dataset_names)}: no class in common"
        )
    return {
        "scored": scored,
        "masked_logits": [n for n in model_names if n not in dataset_names],
        "dropped_classes": [n for n in dataset_names if n not in model_names],
    }


def align_rows(
    rows: pd.DataFrame, info: DatasetInfo, model_names: tuple[str, ...]
) -> tuple[pd.DataFrame, list[str], dict[str, Any] | None]:
    """Rows to score, the scored class names and the cross-dataset record (None when the spaces are equal)."""
    dataset_names = tuple(info.label_space.names)
    if tuple(model_names) == dataset_names:
        return rows, list(dataset_names), None
    if not info.label_space.canonical:
        raise ConfigError(
            f"dataset {info.name!r} uses its own taxonomy {list(dataset_names)}; only a model trained on it "
            f"can be scored on it (the model predicts {list(model_names)})"
        )
    alignment = label_alignment(tuple(model_names), dataset_names)
    keep = rows["label"].map(lambda i: dataset_names[i] in alignment["scored"]).to_numpy(bool)
    dropped = rows.loc[~keep, "label"].map(lambda i: dataset_names[i]).value_counts()
    cross = {
        "model_classes": list(model_names),
        "dataset_classes": list(dataset_names),
        "scored_classes": alignment["scored"],
        "masked_logits": alignment["masked_logits"],
        "dropped_rows": {str(k): int(v) for k, v in dropped.items()},
    }
    return rows[keep].reset_index(drop=True), alignment["scored"], cross


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def _group_values(rows: pd.DataFrame, column: str) -> np.ndarray:
    if "+" in column and column not in rows.columns:
        a, b = column.split("+", 1)
        return (_group_values(rows, a).astype(object) + "|" + _group_values(rows, b).astype(object)).astype(str)
    return rows[column].fillna("unknown").astype(str).to_numpy()


def _exclusion(value: str, n: int, min_group_size: int) -> str | None:
    if any(part.strip().lower() in F.NON_GROUP_VALUES for part in value.split("|")):
        return "not a comparable group (unknown/unsure)"
    if n < min_group_size:
        return f"n < {min_group_size}"
    return None


def _ci(samples: np.ndarray, level: float) -> list[float]:
    return list(B.percentile_interval(samples, level=level))


def group_report(
    *,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    values: np.ndarray,
    label_names: tuple[str, ...],
    n_bootstrap: int,
    seed: int,
    min_group_size: int,
    level: float = 0.95,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per-group table, fairness gaps (with CIs) and dataset bias for one group column."""
    k = len(label_names)
    names, codes = np.unique(values, return_inverse=True)
    cm_g = F.group_confusions(y_true, y_pred, codes, num_groups=len(names), num_classes=k)
    point = F.per_group_metrics(cm_g)
    excluded = {str(v): _exclusion(str(v), int(n), min_group_size) for v, n in zip(names, point["n"], strict=True)}
    eligible = np.array([excluded[str(v)] is None for v in names])
    replicates = B.resample_counts(cm_g, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else None
    rep_acc = M.accuracy_from_cm(replicates) if replicates is not None else None  # [B, G]
    table = {}
    for i, value in enumerate(names):
        table[str(value)] = {
            "n": int(point["n"][i]),
            "acc": float(point["acc"][i]),
            "acc_ci": _ci(rep_acc[:, i], level) if rep_acc is not None else None,
            "mean_class_acc": float(point["mean_class_acc"][i]),
            "macro_f1": float(point["macro_f1"][i]),
            "recall": {name: float(point["recall"][i, c]) for c, name in enumerate(label_names)},
            "excluded_from_gaps": excluded[str(value)],
        }
    gaps = F.fairness_gaps(cm_g, eligible)
    rep_gaps = F.fairness_gaps(replicates, eligible) if replicates is not None else None
    fairness = {
        key: {"value": float(gaps[key]), "ci": _ci(rep_gaps[key], level) if rep_gaps else None} for key in FAIRNESS_KEYS
    }
    fairness["groups_compared"] = [str(v) for v, e in zip(names, eligible, strict=True) if e]
    bias = F.dataset_bias(codes, y_true, num_groups=len(names), num_classes=k)
    dataset_bias = {
        "n": bias["n"],
        "proportions": {str(v): float(p) for v, p in zip(names, bias["proportions"], strict=True)},
        "effective_groups": bias["effective_groups"],
        "evenness": bias["evenness"],
        "cramers_v": bias["cramers_v"],
        "residuals": {
            str(v): {name: float(bias["residuals"][i, c]) for c, name in enumerate(label_names)}
            for i, v in enumerate(names)
        },
    }
    return table, fairness, dataset_bias


def compute_results(
    *,
    y_true: np.ndarray,
    y_pred: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    label_names: tuple[str, ...],
    rows: pd.DataFrame | None = None,
    group_columns: tuple[str, ...] = (),
    subset_columns: tuple[str, ...] = (),
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
    intersections: bool = True,
    level: float = 0.95,
) -> dict[str, Any]:
    """Every metric of one prediction set as a JSON-ready dict (no I/O).

    Headline metrics carry ``level`` percentile bootstrap CIs (``n_bootstrap`` seeded resamples; 0 turns them off);
    each group column (and each pair of them, as ``a+b``) gets a per-group table, fairness gaps with CIs and the
    dataset-bias figures of the scored rows. Groups below ``min_group_size`` or valued unknown/unsure stay in the
    tables, flagged, and are left out of the gaps.
    """
    k = len(label_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        y_pred = probs.argmax(axis=1) if y_pred is None else y_pred
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = M.confusion_matrix(y_true, y_pred, k)
    per_class = M.per_class_precision_recall_f1(y_true, y_pred, k)
    metrics = {name: float(fn(cm)) for name, fn in HEADLINE.items()}
    metrics["weighted_f1"] = float(M.weighted_f1_from_cm(cm))
    calibration = None
    if probs is not None and len(y_true):
        metrics |= {
            "top2_acc": M.top_k_accuracy(y_true, probs, 2),
            "nll": M.nll(y_true, probs),
            "brier": M.brier_score(y_true, probs),
            "ece": M.expected_calibration_error(y_true, probs, 15),
        }
        bins = M.reliability_bins(y_true, probs, 15)
        calibration = {key: np.asarray(value).tolist() for key, value in bins.items()}
    ci = None
    if n_bootstrap and len(y_true):
        replicates = B.resample_counts(cm, n_resamples=n_bootstrap, seed=seed)
        ci = {name: _ci(fn(replicates), level) for name, fn in HEADLINE.items()}
    results: dict[str, Any] = {
        "n": int(len(y_true)),
        "metrics": metrics,
        "ci": ci,
        "bootstrap": {"n_resamples": n_bootstrap, "seed": seed, "level": level, "method": "multinomial cell counts"},
        "per_class": {
            name: {
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(per_class["support"][i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": M.row_normalize(cm).tolist(),
        "calibration": calibration,
        "groups": {},
        "fairness": {},
        "dataset_bias": {},
        "subsets": {},
        "min_group_size": min_group_size,
    }
    if rows is not None:
        columns = [c for c in group_columns if c in rows.columns]
        if intersections:
            columns += [f"{a}+{b}" for a, b in itertools.combinations(columns, 2)]
        for offset, column in enumerate(columns):
            table, fairness, bias = group_report(
                y_true=y_true,
                y_pred=y_pred,
                values=_group_values(rows, column),
                label_names=tuple(label_names),
                n_bootstrap=n_bootstrap,
                seed=seed + 1 + offset,
                min_group_size=min_group_size,
                level=level,
            )
            results["groups"][column], results["fairness"][column], results["dataset_bias"][column] = (
                table,
                fairness,
                bias,
            )
        for column in subset_columns:
            if column in rows.columns:
                mask = rows[column].fillna(False).astype(bool).to_numpy()
                if mask.any():  # e.g. RAF-DB's RAN subsets exist only when the user supplied the lists
                    results["subsets"][column] = M.group_accuracy(y_true, y_pred, np.where(mask, "true", "false"))
    return results


def _space_name(names: list[str], dataset_space) -> str:
    if tuple(names) == tuple(dataset_space.names):
        return dataset_space.name
    for candidate in list_label_spaces():
        if tuple(get_label_space(candidate).names) == tuple(names):
            return candidate
    return "shared"


def train_split_bias(info: DatasetInfo, group_columns: tuple[str, ...]) -> dict[str, Any]:
    """Dataset bias (proportions, effective groups, evenness, Cramér's V) of the training split, per group column:
    stereotypical bias there is what a model learns as a shortcut (Dominguez-Catena et al.)."""
    train = info.manifest[info.manifest["split"] == "train"]
    out: dict[str, Any] = {}
    if train.empty:
        return out
    for column in group_columns:
        if column not in train.columns:
            continue
        names, codes = np.unique(train[column].fillna("unknown").astype(str).to_numpy(), return_inverse=True)
        bias = F.dataset_bias(
            codes, train["label"].to_numpy(), num_groups=len(names), num_classes=info.label_space.num_classes
        )
        out[column] = {
            "n": bias["n"],
            "proportions": {str(v): float(x) for v, x in zip(names, bias["proportions"], strict=True)},
            "effective_groups": bias["effective_groups"],
            "evenness": bias["evenness"],
            "cramers_v": bias["cramers_v"],
        }
    return out


def score(
    *,
    info: DatasetInfo,
    rows: pd.DataFrame,
    scored: list[str],
    probs: np.ndarray | None = None,
    y_pred: np.ndarray | None = None,
    protocol: Protocol | None = None,
    split: str = "test",
    cross: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
) -> dict[str, Any]:
    """The full result of predictions (``probs`` [N, len(scored)] or class indices ``y_pred``) on ``rows``."""
    dataset_names = tuple(info.label_space.names)
    y_true = rows["label"].map(lambda i: scored.index(dataset_names[i])).to_numpy(np.int64)
    group_columns = info.group_columns if protocol is None or protocol.group_columns is None else protocol.group_columns
    results = compute_results(
        y_true=y_true,
        y_pred=y_pred,
        probs=probs,
        label_names=tuple(scored),
        rows=rows,
        group_columns=tuple(group_columns),
        subset_columns=info.subset_columns,
        n_bootstrap=n_bootstrap,
        seed=seed,
        min_group_size=min_group_size,
    )
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "protocol": protocol.to_dict() if protocol else None,
        "dataset_bias_train": train_split_bias(info, tuple(group_columns)),
        "dataset": info.name,
        "layout": info.layout,
        "dataset_splits": info.splits,
        "split": split,
        "label_space": {"name": _space_name(list(scored), info.label_space), "names": list(scored)},
        "cross_dataset": cross,
        "faces": _faces_summary(info.extras.get("alignment"), split),
        "dataset_hash": dataset_hash(rows["image_id"].tolist(), y_true),
        **results,
        "config": config or {},
        "seed": seed,
        "fer_bench_version": __version__,
        "git_sha": git_sha(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _faces_summary(alignment: dict[str, Any] | None, split: str) -> dict[str, Any] | None:
    """How the scored faces were prepared, and how many images of ``split`` the alignment dropped (no face...):
    the scores cover only the faces kept, and the report says so."""
    if not alignment:
        return None
    return {
        "template": alignment.get("template"),
        "landmarks": alignment.get("landmarks"),
        "detector": alignment.get("detector"),
        "weights_sha256": alignment.get("weights_sha256"),
        "dropped": dict((alignment.get("dropped_by_split") or {}).get(split, {})),
    }


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

    def run(kind: str | None, run_hooks: list, options: dict[str, Any]) -> np.ndarray:
        dataset = FaceDataset.from_info(
            info,
            split,
            transform=transform,
            rows=rows,
            perturb=kind,
            perturb_seed=perturb_seed,
            **options,
        )
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
        return renormalize(probs[:, [list(label_names).index(n) for n in scored]])  # masked logits: columns left out

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
    try:
        clean = score(probs=run(None, hooks, data_options), **common)
    finally:
        if isinstance(model, FerModel):
            model.attention_probe = probe
    clean["heads"] = {hook.name: hook.result() for hook in hooks}
    if not perturb:
        return clean
    # the head metrics again, on the perturbed images (fresh hooks: they accumulate); the occlusion perturbation's
    # added occluders have no true mask, so occluded-patch detection is not scored under it
    again, again_options = head_metric_hooks(model, info, rows, label_names) if head_metrics else ([], {})
    if perturb == "occlusion":
        again = [h for h in again if not isinstance(h, OcclusionDetectionHook)]
        again_options.pop("occlusion_masks", None)
    try:
        perturbed = score(probs=run(perturb, again, again_options), **common)
    finally:
        if isinstance(model, FerModel):
            model.attention_probe = probe
    perturbed["heads"] = {hook.name: hook.result() for hook in again}
    perturbed["robustness"] = {
        "perturbation": perturb,
        "seed": perturb_seed,
        "clean": {k: clean["metrics"][k] for k in HEADLINE},
        "drop": {k: clean["metrics"][k] - perturbed["metrics"][k] for k in HEADLINE},
        "clean_heads": clean["heads"],
    }
    return perturbed


# ---------------------------------------------------------------------------------------------------------------------
# MLflow names


_METRIC_NAME = re.compile(r"[^\w\-. :/]")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def flat_metrics(results: dict[str, Any], prefix: str | None = None) -> dict[str, float]:
    """Flat MLflow metric names: ``test/acc``, ``test/acc_ci_low``, ``test/group/race:asian/acc``,
    ``test/fair/race/eq_opp_gap`` (MLflow allows no ``=`` in names, so ``:`` joins column and value)."""
    prefix = prefix or results.get("split", "test")
    out: dict[str, float] = {}
    for key, value in results["metrics"].items():
        out[f"{prefix}/{key}"] = value
    for key, (low, high) in (results.get("ci") or {}).items():
        out[f"{prefix}/{key}_ci_low"], out[f"{prefix}/{key}_ci_high"] = low, high
    for column, table in results.get("groups", {}).items():
        for value, row in table.items():
            out[f"{prefix}/group/{column}:{value}/acc"] = row["acc"]
    for column, gaps in results.get("fairness", {}).items():
        for key in FAIRNESS_KEYS:
            out[f"{prefix}/fair/{column}/{key}"] = gaps[key]["value"]
    for name, values in (results.get("heads") or {}).items():
        for key, value in values.items():
            out[f"{prefix}/heads/{name}/{key}"] = value
    for key, value in (results.get("robustness") or {}).get("drop", {}).items():
        out[f"{prefix}/robustness/{key}_drop"] = value
    return {_METRIC_NAME.sub("_", k): float(v) for k, v in out.items() if _finite(v)}


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def _jsonable(value: Any) -> Any:
    """NaN and inf become null (strict JSON); numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


def _confusion_png(path: Path, cm: np.ndarray, label_names: list[str]) -> None:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(label_names), 0.8 + 0.7 * len(label_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title("Confusion matrix (row-normalised; counts below)")
    fig.tight_layout()
    _save(fig, path)


def _reliability_png(path: Path, calibration: dict[str, Any], ece: float) -> None:
    plt = _plt()
    edges = np.asarray(calibration["edges"], dtype=float)
    accuracy = np.array([np.nan if v is None else v for v in calibration["accuracy"]], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres, np.nan_to_num(accuracy), width=edges[1] - edges[0], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (15 bins), ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _group_columns_for_plots(results: dict[str, Any]) -> list[str]:
    return [c for c in results["groups"] if "+" not in c][:6]


def _group_accuracy_png(path: Path, results: dict[str, Any]) -> None:
    plt = _plt()
    columns = _group_columns_for_plots(results)
    fig, axes = plt.subplots(len(columns), 1, figsize=(7, 2.2 * len(columns)), squeeze=False)
    for ax, column in zip(axes[:, 0], columns, strict=True):
        table = results["groups"][column]
        names = list(table)
        acc = np.array([table[n]["acc"] for n in names], dtype=float)
        ci = [table[n]["acc_ci"] or [np.nan, np.nan] for n in names]
        low = np.array([c[0] if c[0] is not None else np.nan for c in ci], dtype=float)
        high = np.array([c[1] if c[1] is not None else np.nan for c in ci], dtype=float)
        err = np.nan_to_num(np.vstack([acc - low, high - acc]))
        colors = ["tab:blue" if table[n]["excluded_from_gaps"] is None else "lightgrey" for n in names]
        ax.bar(range(len(names)), acc, yerr=err, color=colors, capsize=3)
        ax.axhline(results["metrics"]["acc"], color="black", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(names)), [f"{n}\n(n={table[n]['n']})" for n in names], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{column}: accuracy per group, 95 % CI (grey: left out of gaps; dotted: overall)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _group_recall_png(path: Path, results: dict[str, Any]) -> None:
    plt = _plt()
    columns = _group_columns_for_plots(results)
    classes = results["label_space"]["names"]
    height = sum(1.2 + 0.3 * len(results["groups"][c]) for c in columns)
    fig, axes = plt.subplots(len(columns), 1, figsize=(1.5 + 0.8 * len(classes), height), squeeze=False)
    for ax, column in zip(axes[:, 0], columns, strict=True):
        table = results["groups"][column]
        names = list(table)
        grid = np.array(
            [[table[n]["recall"][c] if table[n]["recall"][c] is not None else np.nan for c in classes] for n in names],
            dtype=float,
        )
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(len(names)):
            for j in range(len(classes)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{column}: recall per group and class", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci_text(ci: list | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


def _protocol_lines(protocol: dict | None) -> list[str]:
    if not protocol:
        return []
    return [
        f"- protocol: {protocol['name']} v{protocol['version']} — {protocol.get('description') or protocol['name']}"
    ]


def _faces_lines(faces: dict | None) -> list[str]:
    if not faces:
        return []
    source = f"{faces['detector']} landmarks" if faces.get("landmarks") == "detector" else "the dataset's landmarks"
    line = f"- faces: aligned to {faces['template']} ({source})"
    dropped = faces.get("dropped") or {}
    if dropped:
        counts = ", ".join(f"{k} {v}" for k, v in dropped.items())
        line += f"; **{sum(dropped.values())} image(s) of this split dropped** ({counts}): the scores cover the rest"
    return [line]


def _cross_dataset_lines(cross: dict[str, Any] | None) -> list[str]:
    if not cross:
        return []
    lines = [
        f"- cross-dataset: the model predicts {len(cross['model_classes'])} classes, the dataset has "
        f"{len(cross['dataset_classes'])}; scored on the {len(cross['scored_classes'])} shared canonical classes"
    ]
    if cross["masked_logits"]:
        lines.append(f"- masked model logits (not in the dataset): {', '.join(cross['masked_logits'])}")
    if cross["dropped_rows"]:
        dropped = ", ".join(f"{k} {v}" for k, v in cross["dropped_rows"].items())
        lines.append(f"- dropped dataset rows (class not predicted by the model): {dropped}")
    return lines


def _report_md(results: dict[str, Any]) -> str:
    m, ci = results["metrics"], results.get("ci") or {}
    names = results["label_space"]["names"]
    protocol = results.get("protocol") or {}
    boot = results.get("bootstrap", {})
    lines = [
        f"# Evaluation: {protocol.get('name', results['dataset'])} / {results['split']}",
        "",
        *_protocol_lines(protocol),
        f"- dataset: {results['dataset']} ({results.get('layout') or 'layout not recorded'})"
        + (f"; splits: {results['dataset_splits']}" if results.get("dataset_splits") else ""),
        f"- checkpoint / predictions: `{results.get('checkpoint') or results.get('predictions') or '-'}`",
        f"- label space: {results['label_space']['name']} ({', '.join(names)})",
        f"- images: {results['n']}; dataset hash `{results['dataset_hash'][:16]}…`",
        f"- test time: {results['config'].get('test_time', '-')}, TTA {results['config'].get('tta', 'none')}"
        + (f", perturbation {results['config']['perturb']}" if results["config"].get("perturb") else ""),
        f"- fer_bench {results['fer_bench_version']} (git {str(results.get('git_sha', '-'))[:10]}), "
        f"{results['created']}",
        *_head_lines(results["config"].get("heads")),
        *_faces_lines(results.get("faces")),
        *_cross_dataset_lines(results.get("cross_dataset")),
        "",
        f"| metric | value | 95 % CI ({boot.get('n_resamples', 0)} bootstrap resamples, seed {boot.get('seed')}) |",
        "|---|---|---|",
    ]
    labels = {
        "acc": "accuracy",
        "mean_class_acc": "mean class accuracy (balanced)",
        "macro_f1": "macro-F1",
        "weighted_f1": "weighted F1",
        "top2_acc": "top-2 accuracy",
        "nll": "NLL",
        "brier": "Brier score",
        "ece": "ECE (15 bins)",
    }
    for key, label in labels.items():
        if key in m:
            lines.append(f"| {label} | {_fmt(m[key])} | {_ci_text(ci.get(key))} |")
    for name, values in (results.get("heads") or {}).items():
        lines += ["", f"## Head metrics: {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in values.items()]
    if results.get("robustness"):
        rob = results["robustness"]
        lines += [
            "",
            f"## Robustness: {rob['perturbation']} (seed {rob['seed']})",
            "",
            "| metric | clean | perturbed | drop |",
            "|---|---|---|---|",
        ]
        for key in HEADLINE:
            lines.append(f"| {labels[key]} | {_fmt(rob['clean'][key])} | {_fmt(m[key])} | {_fmt(rob['drop'][key])} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, r in results["per_class"].items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predictions (`confusion_matrix.png`).",
        "",
        "| true \\ pred | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for name, row in zip(names, results["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if results["groups"]:
        lines += [
            "",
            "## Fairness",
            "",
            f"Groups with fewer than {results.get('min_group_size', 30)} images, and unknown/unsure values, are "
            "shown in the tables but left out of every gap. Gaps: max − min across groups; parity gaps are means "
            'over classes of max − min of per-group row-normalised confusion matrices (README, "Fairness").',
            "",
            "| column | groups compared | worst-group acc | max gap | min/max | fair F1 | dem. parity gap | "
            "eq. opp. gap | eq. odds gap | overall disparity |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for column, f in results["fairness"].items():
            cells = [f"{_fmt(f[k]['value'])} {_ci_text(f[k]['ci'])}" for k in FAIRNESS_KEYS]
            lines.append(f"| {column} | {len(f['groups_compared'])} | " + " | ".join(cells) + " |")
        for column, table in results["groups"].items():
            if "+" in column:
                continue
            lines += [
                "",
                f"### {column}",
                "",
                "| group | n | acc (95 % CI) | mean class acc | macro-F1 | note |",
                "|---|---|---|---|---|---|",
            ]
            for value, r in table.items():
                lines.append(
                    f"| {value} | {r['n']} | {_fmt(r['acc'])} {_ci_text(r['acc_ci'])} | "
                    f"{_fmt(r['mean_class_acc'])} | {_fmt(r['macro_f1'])} | {r['excluded_from_gaps'] or ''} |"
                )
        lines += [
            "",
            "## Dataset bias of the scored rows",
            "",
            "| column | effective groups | evenness | Cramér's V (group × label) | largest residual |",
            "|---|---|---|---|---|",
        ]
        for column, b in results["dataset_bias"].items():
            residuals = [
                (abs(v), g, c, v)
                for g, row in b["residuals"].items()
                for c, v in row.items()
                if v is not None and math.isfinite(v)
            ]
            top = max(residuals) if residuals else None
            worst = f"{top[1]} / {top[2]}: {top[3]:+.2f}" if top else "–"
            lines.append(
                f"| {column} | {_fmt(b['effective_groups'], 2)} | {_fmt(b['evenness'], 3)} | "
                f"{_fmt(b['cramers_v'], 3)} | {worst} |"
            )
    if results.get("dataset_bias_train"):
        lines += [
            "",
            "## Dataset bias of the training split",
            "",
            "Stereotypical bias here (a high Cramér's V) is what a model can learn as a shortcut.",
            "",
            "| column | n | effective groups | evenness | Cramér's V (group × label) |",
            "|---|---|---|---|---|",
        ]
        for column, b in results["dataset_bias_train"].items():
            lines.append(
                f"| {column} | {b['n']} | {_fmt(b['effective_groups'], 2)} | {_fmt(b['evenness'], 3)} | "
                f"{_fmt(b['cramers_v'], 3)} |"
            )
    if results["subsets"]:
        lines += ["", "## Accuracy per subset", "", "| subset | in subset | n | accuracy |", "|---|---|---|---|"]
        for column, table in results["subsets"].items():
            for value, r in table.items():
                lines.append(f"| {column} | {value} | {r['n']} | {r['acc']:.4f} |")
    return "\n".join(lines) + "\n"


def _head_lines(heads: dict | None) -> list[str]:
    """One report line per model head with its effective settings (e.g. whether anchors correct at test time)."""
    return [
        f"- head {name}: " + ", ".join(f"{key} {value}" for key, value in settings.items())
        for name, settings in (heads or {}).items()
    ]


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and the PNG plots into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _jsonable(results)
    paths = {"results": out / "results.json", "report": out / "report.md", "confusion": out / "confusion_matrix.png"}
    atomic_write_text(paths["results"], json.dumps(results, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["report"], _report_md(results))
    _confusion_png(paths["confusion"], np.asarray(results["confusion_matrix"]), results["label_space"]["names"])
    if results.get("calibration"):
        paths["reliability"] = out / "reliability.png"
        _reliability_png(paths["reliability"], results["calibration"], results["metrics"]["ece"])
    if _group_columns_for_plots(results):
        paths["group_accuracy"] = out / "group_accuracy.png"
        _group_accuracy_png(paths["group_accuracy"], results)
        paths["group_recall"] = out / "group_recall.png"
        _group_recall_png(paths["group_recall"], results)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Submissions


def score_submission(
    path: str | os.PathLike,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
) -> dict[str, Any]:
    """Validate a submission CSV against the protocol's rows and score it like a model's predictions."""
    from fer_bench._io import sha256_file
    from fer_bench.eval.submission import read_submission

    rows = protocol_rows(protocol, info)
    scored = list(info.label_space.names)
    submission = read_submission(path, expected_ids=rows["image_id"].astype(str).tolist(), label_names=tuple(scored))
    probs = submission["probs"]
    results = score(
        info=info,
        rows=rows,
        scored=scored,
        probs=probs,
        y_pred=None if probs is not None else submission["y_pred"],
        protocol=protocol,
        split=protocol.split,
        config={"submission": submission["kind"], "min_group_size": min_group_size},
        n_bootstrap=n_bootstrap,
        seed=seed,
        min_group_size=min_group_size,
    )
    results["predictions"] = str(path)
    results["submission_sha256"] = sha256_file(Path(path))
    results["predictions_sha256"] = submission["content_sha256"]  # the board's duplicate check: content, not bytes
    return results


def protocol_probabilities(
    model: FerModel,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    img_size: int,
    label_names: tuple[str, ...],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    tta: str | None = None,
    progress=None,
) -> tuple[list[str], np.ndarray]:
    """(ids, probabilities [N, K_dataset]) of ``model`` on every row of the protocol, ready for a submission.

    Classes the model does not predict get probability 0; classes the dataset lacks are masked, the rest renormalised.
    """
    rows = protocol_rows(protocol, info)
    dataset_names = list(info.label_space.names)
    if not info.label_space.canonical and tuple(label_names) != tuple(dataset_names):
        align_rows(rows, info, label_names)  # raises the taxonomy error
    shared = [n for n in dataset_names if n in label_names]
    if not shared:
        label_alignment(tuple(label_names), tuple(dataset_names))  # raises "no class in common"
    dataset = FaceDataset.from_info(
        info, protocol.split, transform=create_transform(train=False, img_size=img_size), rows=rows
    )
    probs = predict(model, dataset, batch_size=batch_size, device=device, tta=tta, progress=progress)
    full = np.zeros((len(rows), len(dataset_names)))
    for name in shared:
        full[:, dataset_names.index(name)] = probs[:, list(label_names).index(name)]
    return rows["image_id"].astype(str).tolist(), renormalize(full)


def compare_submissions(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap test of two submissions on the same protocol rows: for accuracy, mean class accuracy and
    macro-F1, the difference A − B, its CI and the p-value of "A beats B"."""
    from fer_bench.eval.submission import read_submission

    rows = protocol_rows(protocol, info)
    names = tuple(info.label_space.names)
    ids = rows["image_id"].astype(str).tolist()
    a = read_submission(path_a, expected_ids=ids, label_names=names)["y_pred"]
    b = read_submission(path_b, expected_ids=ids, label_names=names)["y_pred"]
    y_true = rows["label"].to_numpy(np.int64)
    return {
        key: B.paired_bootstrap_test(
            y_true, a, b, num_classes=len(names), statistic=fn, n_resamples=n_bootstrap, seed=seed
        )
        for key, fn in HEADLINE.items()
    }
