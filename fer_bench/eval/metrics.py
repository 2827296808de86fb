"""Classification and calibration metrics: pure numpy, vectorised.

Every confusion-matrix metric takes counts ``cm`` of shape ``[..., K, K]`` (rows = true class, columns = predicted)
and returns one value per leading index, so a stack of bootstrap replicates is scored in one call. Wrappers taking
``(y_true, y_pred)`` exist for the common case. Conventions follow scikit-learn (``zero_division=0``): a class with
no predictions has precision 0, a class absent from both truth and predictions is left out of macro averages.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------------------------------
# Confusion matrices


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Counts C[i, j] = #samples with true class i predicted as j (optionally weighted).

    Example:
        >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
        [[1, 0], [1, 1]]
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, weights=weights, minlength=num_classes * num_classes)
    out = flat.reshape(num_classes, num_classes)
    return out if weights is not None else out.astype(np.int64)


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Rows divided by their sums (P(pred = j | true = i)); rows without samples are NaN.

    Example:
        >>> row_normalize(np.array([[1, 3], [0, 0]])).tolist()
        [[0.25, 0.75], [nan, nan]]
    """
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, cm / np.where(support > 0, support, 1), np.nan)


def _diag(cm: np.ndarray) -> np.ndarray:
    return np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# From confusion matrices ([..., K, K] -> [...])


def accuracy_from_cm(cm: np.ndarray) -> np.ndarray:
    """Accuracy = trace(C) / ΣC (NaN for an empty matrix).

    Example:
        >>> float(accuracy_from_cm(np.array([[3, 1], [0, 4]])))
        0.875
    """
    total = cm.sum(axis=(-2, -1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, _diag(cm).sum(-1) / np.where(total > 0, total, 1), np.nan)


def recall_from_cm(cm: np.ndarray) -> np.ndarray:
    """Per-class recall TP / (TP + FN), [..., K]; NaN for a class with no true samples."""
    support = cm.sum(axis=-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, _diag(cm) / np.where(support > 0, support, 1), np.nan)


def precision_from_cm(cm: np.ndarray) -> np.ndarray:
    """Per-class precision TP / (TP + FP), [..., K]; 0 for a class never predicted (scikit-learn's zero_division=0)."""
    predicted = cm.sum(axis=-2).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(predicted > 0, _diag(cm) / np.where(predicted > 0, predicted, 1), 0.0)


def f1_from_cm(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2 TP / (2 TP + FP + FN), [..., K]; 0 where the denominator is 0.

    Example:
        >>> f1_from_cm(np.array([[2, 0], [2, 0]])).round(3).tolist()
        [0.667, 0.0]
    """
    tp = _diag(cm)
    denominator = cm.sum(axis=-1) + cm.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 0.0)


def mean_class_accuracy_from_cm(cm: np.ndarray) -> np.ndarray:
    """Balanced accuracy: mean per-class recall over the classes present in the truth.

    Example:
        >>> float(mean_class_accuracy_from_cm(np.array([[9, 1], [1, 1]])))
        0.7
    """
    return nanmean(recall_from_cm(cm), axis=-1)


def macro_f1_from_cm(cm: np.ndarray) -> np.ndarray:
    """Unweighted mean of per-class F1 over the classes present in the truth or the predictions."""
    present = (cm.sum(axis=-1) + cm.sum(axis=-2)) > 0
    f1 = f1_from_cm(cm)
    count = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (f1 * present).sum(-1) / np.where(count > 0, count, 1), np.nan)


def weighted_f1_from_cm(cm: np.ndarray) -> np.ndarray:
    """Support-weighted mean of per-class F1: Σ_k n_k F1_k / Σ_k n_k."""
    support = cm.sum(axis=-1).astype(np.float64)
    total = support.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (f1_from_cm(cm) * support).sum(-1) / np.where(total > 0, total, 1), np.nan)


def nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (without a warning) where every value is NaN.

    Example:
        >>> nanmean(np.array([[1.0, np.nan], [np.nan, np.nan]])).tolist()
        [1.0, nan]
    """
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)


# ---------------------------------------------------------------------------------------------------------------------
# (y_true, y_pred) wrappers


def accuracy_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Overall accuracy = (1/N) Σ 1[y_pred = y_true].

    Example:
        >>> accuracy_score(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
        0.75
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def per_class_precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), and support = TP+FN.

    Undefined ratios (no predictions / no true samples) are 0, as scikit-learn's ``zero_division=0``.

    Example:
        >>> r = per_class_precision_recall_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), 2)
        >>> r["precision"].tolist(), r["recall"].tolist(), r["support"].tolist()
        ([1.0, 0.5], [0.5, 1.0], [2, 1])
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return {
        "precision": precision_from_cm(cm),
        "recall": np.nan_to_num(recall_from_cm(cm), nan=0.0),
        "f1": f1_from_cm(cm),
        "support": cm.sum(axis=1),
    }


def mean_class_accuracy_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``y_true`` of per-class recall (balanced accuracy).

    Example:
        >>> mean_class_accuracy_score(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2)
        0.5
    """
    return float(mean_class_accuracy_from_cm(confusion_matrix(y_true, y_pred, num_classes)))


def macro_f1_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``.

    Example:
        >>> round(macro_f1_score(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3), 4)
        0.7333
    """
    return float(macro_f1_from_cm(confusion_matrix(y_true, y_pred, num_classes)))


def weighted_f1_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Support-weighted F1 (scikit-learn ``average='weighted'``)."""
    return float(weighted_f1_from_cm(confusion_matrix(y_true, y_pred, num_classes)))


def group_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy and count per value of ``groups`` ([N] strings or bools).

    Example:
        >>> group_accuracy(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array(["a", "a", "b"]))
        {'a': {'n': 2, 'acc': 0.5}, 'b': {'n': 1, 'acc': 1.0}}
    """
    correct = np.asarray(y_true) == np.asarray(y_pred)
    groups = np.asarray(groups).astype(str)
    return {
        str(value): {"n": int((groups == value).sum()), "acc": float(correct[groups == value].mean())}
        for value in np.unique(groups)
    }


# ---------------------------------------------------------------------------------------------------------------------
# Probability metrics ([N, K] probabilities)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int = 2) -> float:
    """Fraction of samples whose true class is among the ``k`` most probable (ties broken by index order).

    Example:
        >>> top_k_accuracy(np.array([2, 0]), np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]), k=2)
        0.0
    """
    probs = np.asarray(probs, dtype=np.float64)
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def nll(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Negative log-likelihood -(1/N) Σ log p_{y_i}, with p clipped to [eps, 1] (scikit-learn's log_loss).

    Example:
        >>> round(nll(np.array([0, 1]), np.array([[0.5, 0.5], [0.2, 0.8]])), 4)
        0.4581
    """
    probs = np.asarray(probs, dtype=np.float64)
    total = probs.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, probs / np.where(total > 0, total, 1), 1.0 / probs.shape[1])
    picked = np.clip(probs[np.arange(len(probs)), np.asarray(y_true)], eps, 1.0)
    return float(-np.log(picked).mean())


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score (1/N) Σ_i Σ_k (p_ik - 1[y_i = k])² (Brier 1950; range 0..2).

    Example:
        >>> brier_score(np.array([0]), np.array([[0.5, 0.5]]))
        0.5
    """
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y_true)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin (max probability in (b/n, (b+1)/n], the first bin also holding 0): count,
    mean confidence and accuracy (NaN for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": accuracy, "edges": np.linspace(0, 1, n_bins + 1)}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N) |acc_b - conf_b| over 15 equal-width confidence bins (Guo et al., ICML 2017).

    Example:
        >>> # two samples at confidence 0.9: one right, one wrong -> |0.5 - 0.9| = 0.4
        >>> round(expected_calibration_error(np.array([0, 1]), np.array([[0.9, 0.1], [0.9, 0.1]])), 6)
        0.4
    """
    bins = reliability_bins(y_true, probs, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] * gap).sum() / max(bins["count"].sum(), 1))
