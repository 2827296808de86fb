"""Classification metrics as pure numpy functions (no torch, no I/O).

Conventions: ``y_true`` and ``y_pred`` are int arrays of shape [N] with values in ``[0, num_classes)``.
``*_score`` is higher-better.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts C[i, j] = #samples with true class i predicted as j.

    Args:
        y_true, y_pred: [N] int labels.
        num_classes: K; the matrix is K x K even for classes absent from the data.

    Returns:
        [K, K] int64 counts; rows are true classes.

    References:
        Same as ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(K))``.

    Example:
        >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), 2).tolist()
        [[1, 0], [1, 1]]
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def accuracy_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Overall accuracy = (1/N) Σ 1[y_pred = y_true].

    Example:
        >>> accuracy_score(np.array([0, 1, 1, 2]), np.array([0, 1, 0, 2]))
        0.75
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def per_class_precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), and support = TP+FN.

    A class with no predictions has precision 0; a class with no samples has recall 0 (sklearn's
    ``zero_division=0``).

    Example:
        >>> r = per_class_precision_recall_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), 2)
        >>> r["precision"].tolist(), r["recall"].tolist()
        ([1.0, 0.5], [0.5, 1.0])
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def mean_class_accuracy_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``y_true`` of per-class recall (balanced accuracy).

    References:
        ``sklearn.metrics.balanced_accuracy_score``.

    Example:
        >>> mean_class_accuracy_score(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2)
        0.5
    """
    r = per_class_precision_recall_f1(y_true, y_pred, num_classes)
    present = r["support"] > 0
    return float(r["recall"][present].mean()) if present.any() else float("nan")


def macro_f1_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``.

    References:
        ``sklearn.metrics.f1_score(average="macro")`` (which averages over the labels present in either array).

    Example:
        >>> macro_f1_score(np.array([0, 0, 1]), np.array([0, 1, 1]), 2)
        0.6666666666666666
    """
    r = per_class_precision_recall_f1(y_true, y_pred, num_classes)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(r["f1"][present].mean()) if present.any() else float("nan")


def group_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy and count per value of ``groups`` ([N] strings or bools).

    Example:
        >>> group_accuracy(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array(["a", "b", "b"]))
        {'a': {'n': 1, 'acc': 1.0}, 'b': {'n': 2, 'acc': 0.5}}
    """
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups).astype(str)
    out = {}
    for value in sorted(set(groups.tolist())):
        sel = groups == value
        out[value] = {"n": int(sel.sum()), "acc": accuracy_score(y_true[sel], y_pred[sel])}
    return out
