"""Bias and fairness figures for multi-class FER: pure numpy, vectorised over bootstrap replicates.

Model bias is computed from per-group confusion matrices ``cm_g`` of shape ``[..., G, K, K]`` (counts; rows = true
class). Only *eligible* groups (enough samples, not ``unknown``/``unsure``) enter gaps; the caller passes that mask.
Dataset bias is computed from the group × label contingency table of a split.

References: Putzel & Lee (2022) multi-class parity definitions as adapted by Dominguez-Catena et al. (AISafety 2022,
arXiv 2205.10049; ``model_bias_metrics.py``): demographic parity of the predicted-class distribution, equal
opportunity of per-class recall, equalized odds over the full row-normalised confusion matrix, each as the mean
over classes (cells) of the max − min across groups; intraclass / overall disparity (mean over groups of
1 − recall_g / max_g recall_g); "fair F1" (Hu, Kollias et al., FG 2024): mean over groups of per-group macro-F1.
Dataset bias (Dominguez-Catena et al., TPAMI 2024, arXiv 2303.15889): effective number of groups exp(H),
Shannon evenness H / ln G, Cramér's V between group and label, and standardised residuals (O − E) / √E.
"""

from __future__ import annotations

import numpy as np

from fer_bench.eval.metrics import (
    accuracy_from_cm,
    macro_f1_from_cm,
    mean_class_accuracy_from_cm,
    nanmean,
    recall_from_cm,
    row_normalize,
)

#: Group values kept in per-group tables but left out of gaps (not a demographic group one can compare).
NON_GROUP_VALUES: frozenset[str] = frozenset({"unknown", "unsure", "", "nan", "none"})


def group_confusions(
    y_true: np.ndarray, y_pred: np.ndarray, group_index: np.ndarray, *, num_groups: int, num_classes: int
) -> np.ndarray:
    """Per-group confusion matrices [G, K, K] from integer group codes.

    Example:
        >>> group_confusions(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0, 0, 1]),
        ...                  num_groups=2, num_classes=2).tolist()
        [[[1, 0], [0, 1]], [[0, 0], [1, 0]]]
    """
    k = num_classes
    code = (np.asarray(group_index) * k + np.asarray(y_true)) * k + np.asarray(y_pred)
    return np.bincount(code, minlength=num_groups * k * k).reshape(num_groups, k, k)


def _group_range(values: np.ndarray, eligible: np.ndarray, axis: int) -> np.ndarray:
    """max − min over the eligible, non-NaN entries along the group ``axis``; NaN with fewer than two."""
    mask_shape = [1] * values.ndim
    mask_shape[axis] = -1
    ok = ~np.isnan(values) & eligible.reshape(mask_shape)
    high = np.where(ok, values, -np.inf).max(axis=axis)
    low = np.where(ok, values, np.inf).min(axis=axis)
    return np.where(ok.sum(axis=axis) >= 2, high - low, np.nan)


def per_group_metrics(cm_g: np.ndarray) -> dict[str, np.ndarray]:
    """n, accuracy, mean class accuracy, macro-F1 ([..., G]) and per-class recall ([..., G, K]) per group."""
    return {
        "n": cm_g.sum(axis=(-2, -1)),
        "acc": accuracy_from_cm(cm_g),
        "mean_class_acc": mean_class_accuracy_from_cm(cm_g),
        "macro_f1": macro_f1_from_cm(cm_g),
        "recall": recall_from_cm(cm_g),
    }


def fairness_gaps(cm_g: np.ndarray, eligible: np.ndarray) -> dict[str, np.ndarray]:
    """Model-bias figures over the eligible groups, each of shape ``cm_g.shape[:-3]``.

    * ``worst_group_acc`` = min_g acc_g; ``max_gap`` = max_g acc_g − min_g acc_g; ``min_max_ratio`` = min / max;
    * ``fair_f1`` = mean_g macro-F1_g;
    * ``dem_parity_gap`` = mean_c [max_g − min_g] P(pred = c | g);
    * ``eq_opp_gap`` = mean_c [max_g − min_g] recall_{g,c} (classes with support in at least two groups);
    * ``eq_odds_gap`` = mean over (true, pred) cells of [max_g − min_g] P(pred | true, g);
    * ``overall_disparity`` = mean_c mean_g (1 − recall_{g,c} / max_g recall_{g,c}).

    Example (two groups; group 1 never recognises class 1):
        >>> cm = np.array([[[5, 0], [0, 5]], [[5, 0], [5, 0]]])
        >>> g = fairness_gaps(cm, np.array([True, True]))
        >>> [round(float(g[k]), 3) for k in ("max_gap", "eq_opp_gap", "dem_parity_gap", "overall_disparity")]
        [0.5, 0.5, 0.5, 0.25]
    """
    eligible = np.asarray(eligible, dtype=bool)
    metrics = per_group_metrics(cm_g)
    acc = np.where(eligible, metrics["acc"], np.nan)
    ok = ~np.isnan(acc)
    high = np.where(ok, acc, -np.inf).max(axis=-1)
    low = np.where(ok, acc, np.inf).min(axis=-1)
    any_ok = ok.any(axis=-1)
    two = ok.sum(axis=-1) >= 2
    n = cm_g.sum(axis=(-2, -1)).astype(np.float64)[..., None]  # [..., G, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.where(n > 0, cm_g.sum(axis=-2) / np.where(n > 0, n, 1), np.nan)  # [..., G, K]
        recall = metrics["recall"]  # [..., G, K]
        best = np.where(~np.isnan(recall) & eligible[:, None], recall, -np.inf).max(axis=-2, keepdims=True)
        ratio = np.where(best > 0, recall / np.where(best > 0, best, 1), np.nan)
        disparity_gc = np.where(eligible[:, None], 1 - ratio, np.nan)  # [..., G, K]
        norm = row_normalize(cm_g)  # [..., G, K, K]
        out = {
            "worst_group_acc": np.where(any_ok, low, np.nan),
            "max_gap": np.where(two, high - low, np.nan),
            "min_max_ratio": np.where(two & (high > 0), low / np.where(high > 0, high, 1), np.nan),
            "fair_f1": nanmean(np.where(eligible, metrics["macro_f1"], np.nan), axis=-1),
            "dem_parity_gap": nanmean(_group_range(predicted, eligible, axis=-2), axis=-1),
            "eq_opp_gap": nanmean(_group_range(recall, eligible, axis=-2), axis=-1),
            "eq_odds_gap": nanmean(_group_range(norm.reshape(*norm.shape[:-2], -1), eligible, axis=-2), axis=-1),
            "overall_disparity": nanmean(nanmean(np.swapaxes(disparity_gc, -1, -2), axis=-1), axis=-1),
        }
    return out


def dataset_bias(group_index: np.ndarray, labels: np.ndarray, *, num_groups: int, num_classes: int) -> dict:
    """Representational and stereotypical bias of a split.

    * ``proportions`` per group; ``effective_groups`` = exp(H) with H = −Σ p ln p; ``evenness`` = H / ln G
      (G = groups present; 1 = perfectly balanced);
    * ``cramers_v`` = √(χ² / (N (min(G, K) − 1))) of the group × label table (0 = labels independent of group,
      1 = each group has its own labels); ``residuals`` [G, K] = (O − E) / √E.

    Example:
        >>> balanced = dataset_bias(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), num_groups=2, num_classes=2)
        >>> stereotyped = dataset_bias(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), num_groups=2, num_classes=2)
        >>> balanced["cramers_v"], balanced["evenness"], stereotyped["cramers_v"]
        (0.0, 1.0, 1.0)
    """
    table = (
        np.bincount(np.asarray(group_index) * num_classes + np.asarray(labels), minlength=num_groups * num_classes)
        .reshape(num_groups, num_classes)
        .astype(np.float64)
    )
    total = table.sum()
    group_totals, label_totals = table.sum(axis=1), table.sum(axis=0)
    proportions = group_totals / total if total else np.full(num_groups, np.nan)
    present = proportions[proportions > 0]
    entropy = float(-(present * np.log(present)).sum())
    expected = np.outer(group_totals, label_totals) / total if total else np.zeros_like(table)
    with np.errstate(invalid="ignore", divide="ignore"):
        residuals = np.where(expected > 0, (table - expected) / np.sqrt(np.where(expected > 0, expected, 1)), np.nan)
        chi2 = float(np.nansum(np.where(expected > 0, (table - expected) ** 2 / expected, 0.0)))
    dof = min(int((group_totals > 0).sum()), int((label_totals > 0).sum())) - 1
    return {
        "n": int(total),
        "proportions": proportions,
        "effective_groups": float(np.exp(entropy)),
        "evenness": float(entropy / np.log(len(present))) if len(present) > 1 else float("nan"),
        "cramers_v": float(np.sqrt(chi2 / (total * dof))) if dof > 0 and total else float("nan"),
        "residuals": residuals,
    }
