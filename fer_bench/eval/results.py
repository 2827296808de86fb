"""Predictions to the results dict: headline metrics with bootstrap CIs, calibration, per-class figures, per-group
tables, fairness gaps and dataset bias (no I/O).

Metrics come from :mod:`fer_bench.eval.metrics`, confidence intervals from :mod:`fer_bench.eval.bootstrap` and
bias figures from :mod:`fer_bench.eval.fairness`; this module gathers them, and aligns a model's classes with a
dataset's (:func:`label_alignment`).
"""

from __future__ import annotations

import datetime as _dt
import itertools
from typing import Any

import numpy as np
import pandas as pd

from fer_bench import __version__
from fer_bench.data import DatasetInfo, dataset_hash, get_label_space
from fer_bench.data.labels import list_label_spaces
from fer_bench.errors import ConfigError
from fer_bench.eval import bootstrap as B
from fer_bench.eval import fairness as F
from fer_bench.eval import metrics as M
from fer_bench.eval.fairness_inference import gap_inference
from fer_bench.eval.protocols import Protocol
from fer_bench.provenance import git_sha

RESULTS_SCHEMA_VERSION = 2
#: The results key of the per-image record (column -> values, one per scored image, in the rows' order); written to
#: ``predictions.csv`` by ``write_report``, never to ``results.json``.
PER_IMAGE = "per_image"
HEADLINE = {"acc": M.accuracy_from_cm, "mean_class_acc": M.mean_class_accuracy_from_cm, "macro_f1": M.macro_f1_from_cm}
#: How the fairness figures are computed (recorded in results.json).
FAIRNESS_METHOD = (
    "plug-in + bootstrap bias correction; bounded-root interval from within-group resamples; "
    "permutation chance level drawn on counts"
)

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
    """Per-group table, fairness gaps and dataset bias for one group column.

    Group accuracies get percentile CIs from a bootstrap that keeps each group's size; every gap gets the plug-in,
    a bias-corrected estimate, a bounded-root interval holding both and its chance level under permutation
    (``fairness_inference.gap_inference``, with ``n_bootstrap`` resamples and as many permutations).
    """
    k = len(label_names)
    names, codes = np.unique(values, return_inverse=True)
    cm_g = F.group_confusions(y_true, y_pred, codes, num_groups=len(names), num_classes=k)
    point = F.per_group_metrics(cm_g)
    excluded = {str(v): _exclusion(str(v), int(n), min_group_size) for v, n in zip(names, point["n"], strict=True)}
    eligible = np.array([excluded[str(v)] is None for v in names])
    replicates = B.resample_within(cm_g, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else None
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
    fairness: dict[str, Any] = gap_inference(
        cm_g, eligible=eligible, n_bootstrap=n_bootstrap, n_permutations=n_bootstrap, seed=seed, level=level
    )
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
    each group column (and each pair of them, as ``a+b``) gets a per-group table, fairness gaps (plug-in,
    bias-corrected, bounded-root interval and chance level; ``fairness_inference``) and the
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
        "bootstrap": {
            "n_resamples": n_bootstrap,
            "seed": seed,
            "level": level,
            "method": "multinomial cell counts",
            "fairness": FAIRNESS_METHOD,
        },
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
    if y_pred is None and probs is not None:
        y_pred = np.asarray(probs).argmax(axis=1)
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
        PER_IMAGE: per_image_columns(
            rows=rows,
            y_true=y_true,
            y_pred=np.asarray(y_pred, dtype=np.int64),
            group_columns=tuple(group_columns),
            subset_columns=tuple(info.subset_columns),
        ),
        "config": config or {},
        "seed": seed,
        "fer_bench_version": __version__,
        "git_sha": git_sha(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def per_image_columns(
    *,
    rows: pd.DataFrame,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    group_columns: tuple[str, ...],
    subset_columns: tuple[str, ...],
) -> dict[str, list]:
    """The per-image record of one scoring (``results[PER_IMAGE]``), in the order of ``rows``: ``image_id``,
    ``y_true`` and ``y_pred`` (indices into ``label_space.names``), then each group column the rows have (as text,
    missing values ``unknown``, as the group tables count them) and each subset column (``true``/``false``).

    Example:
        >>> rows = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1], "gender": ["f", None]})
        >>> per_image_columns(rows=rows, y_true=np.array([0, 1]), y_pred=np.array([0, 0]),
        ...                   group_columns=("gender",), subset_columns=())
        {'image_id': ['a', 'b'], 'y_true': [0, 1], 'y_pred': [0, 0], 'gender': ['f', 'unknown']}
    """
    out: dict[str, list] = {
        "image_id": rows["image_id"].astype(str).tolist(),
        "y_true": [int(v) for v in y_true],
        "y_pred": [int(v) for v in y_pred],
    }
    for column in group_columns:
        if column in rows.columns and column not in out:
            out[column] = _group_values(rows, column).tolist()
    for column in subset_columns:
        if column in rows.columns and column not in out:
            out[column] = np.where(rows[column].fillna(False).astype(bool).to_numpy(), "true", "false").tolist()
    return out


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
