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


def rate_counts(cm_g: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The (numerator, denominator) counts of the rate a gap compares across groups, each ``[..., G, C]``.

    ``kind``: ``accuracy`` (C = 1: correct / n_g), ``prediction`` (C = K: predicted as c / n_g), ``recall``
    (C = K: correct in true class c / n_{g,c}) or ``confusion`` (C = K²: cell (c, j) / n_{g,c}).

    Example:
        >>> num, den = rate_counts(np.array([[[3, 1], [0, 4]]]), "recall")
        >>> num.tolist(), den.tolist()
        ([[3.0, 4.0]], [[4.0, 4.0]])
    """
    cm = np.asarray(cm_g, dtype=np.float64)
    k = cm.shape[-1]
    n = cm.sum(axis=(-2, -1))[..., None]  # [..., G, 1]
    if kind == "accuracy":
        return np.trace(cm, axis1=-2, axis2=-1)[..., None], n
    if kind == "prediction":
        num = cm.sum(axis=-2)
        return num, np.broadcast_to(n, num.shape)
    if kind == "recall":
        return np.diagonal(cm, axis1=-2, axis2=-1).copy(), cm.sum(axis=-1)
    if kind == "confusion":
        return cm.reshape(*cm.shape[:-2], k * k), np.repeat(cm.sum(axis=-1), k, axis=-1)
    raise ValueError(f"kind: expected accuracy, prediction, recall or confusion, got {kind!r}")


def rates(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where the denominator is 0 (a group without data in that cell)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _valid_cells(r: np.ndarray) -> np.ndarray:
    """Cells ([..., C]) with at least two groups that have data: the cells a gap is defined on."""
    return (~np.isnan(r)).sum(axis=-2) >= 2


def range_over_groups(r: np.ndarray) -> np.ndarray:
    """mean_c [max_g r_gc − min_g r_gc] over the cells where at least two groups have data; ``r`` is [..., G, C].

    Example:
        >>> round(float(range_over_groups(np.array([[0.9, 0.5], [0.7, np.nan]]))), 6)
        0.2
    """
    ok = ~np.isnan(r)
    high = np.where(ok, r, -np.inf).max(axis=-2)
    low = np.where(ok, r, np.inf).min(axis=-2)
    return nanmean(np.where(_valid_cells(r), high - low, np.nan), axis=-1)


def min_over_groups(r: np.ndarray) -> np.ndarray:
    """min_g r_g of a one-cell rate [..., G, 1] (worst-group accuracy); NaN when no group has data."""
    ok = ~np.isnan(r[..., 0])
    low = np.where(ok, r[..., 0], np.inf).min(axis=-1)
    return np.where(ok.any(axis=-1), low, np.nan)


def ratio_over_groups(r: np.ndarray) -> np.ndarray:
    """min_g r_g / max_g r_g of a one-cell rate [..., G, 1]; NaN with fewer than two groups or a zero maximum."""
    ok = ~np.isnan(r[..., 0])
    high = np.where(ok, r[..., 0], -np.inf).max(axis=-1)
    low = np.where(ok, r[..., 0], np.inf).min(axis=-1)
    good = (ok.sum(axis=-1) >= 2) & (high > 0)
    return np.where(good, low / np.where(good, high, 1), np.nan)


def relative_shortfall(r: np.ndarray) -> np.ndarray:
    """mean_c [1 − mean_g r_gc / max_g r_gc] (overall disparity when r is per-class recall), [..., G, C] → [...].

    Example:
        >>> float(relative_shortfall(np.array([[1.0, 1.0], [1.0, 0.0]])))
        0.25
    """
    ok = ~np.isnan(r)
    high = np.where(ok, r, -np.inf).max(axis=-2)
    mean = nanmean(np.swapaxes(r, -1, -2), axis=-1)
    good = _valid_cells(r) & (high > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return nanmean(np.where(good, 1 - mean / np.where(good, high, 1), np.nan), axis=-1)


#: Each gap: the rate it compares (:func:`rate_counts` kind), the functional over groups, and which way is worse
#: ("higher" = a larger value means more disparity; "lower" = a smaller value does).
GAP_DEFINITIONS: dict[str, tuple[str, object, str]] = {
    "worst_group_acc": ("accuracy", min_over_groups, "lower"),
    "max_gap": ("accuracy", range_over_groups, "higher"),
    "min_max_ratio": ("accuracy", ratio_over_groups, "lower"),
    "dem_parity_gap": ("prediction", range_over_groups, "higher"),
    "eq_opp_gap": ("recall", range_over_groups, "higher"),
    "eq_odds_gap": ("confusion", range_over_groups, "higher"),
    "overall_disparity": ("recall", relative_shortfall, "higher"),
}


def gap_value(cm_g: np.ndarray, key: str) -> np.ndarray:
    """One gap of :data:`GAP_DEFINITIONS` from per-group confusion matrices [..., G, K, K] (groups already chosen)."""
    kind, functional, _ = GAP_DEFINITIONS[key]
    return functional(rates(*rate_counts(cm_g, kind)))


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
    """Model-bias figures (plug-in estimates) over the eligible groups, each of shape ``cm_g.shape[:-3]``.

    * ``worst_group_acc`` = min_g acc_g; ``max_gap`` = max_g acc_g − min_g acc_g; ``min_max_ratio`` = min / max;
    * ``fair_f1`` = mean_g macro-F1_g;
    * ``dem_parity_gap`` = mean_c [max_g − min_g] P(pred = c | g);
    * ``eq_opp_gap`` = mean_c [max_g − min_g] recall_{g,c};
    * ``eq_odds_gap`` = mean over (true, pred) cells of [max_g − min_g] P(pred | true, g);
    * ``overall_disparity`` = mean_c mean_g (1 − recall_{g,c} / max_g recall_{g,c}).

    Per-class gaps use the classes present in at least two groups. Max − min gaps of noisy group estimates are
    biased upward (and the worst group and min/max ratio downward): ``fairness_inference`` gives corrected
    estimates, intervals and chance levels.

    Example (two groups; group 1 never recognises class 1):
        >>> cm = np.array([[[5, 0], [0, 5]], [[5, 0], [5, 0]]])
        >>> g = fairness_gaps(cm, np.array([True, True]))
        >>> [round(float(g[k]), 3) for k in ("max_gap", "eq_opp_gap", "dem_parity_gap", "overall_disparity")]
        [0.5, 0.5, 0.5, 0.25]
    """
    chosen = np.asarray(cm_g)[..., np.asarray(eligible, dtype=bool), :, :]
    out = {key: gap_value(chosen, key) for key in GAP_DEFINITIONS}
    out["fair_f1"] = nanmean(macro_f1_from_cm(chosen), axis=-1)
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
