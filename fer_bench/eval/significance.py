"""Does recipe A beat recipe B? The two-source paired Welch t test over seeds and test images, and Holm's correction.

Two arms are trained with k_A and k_B seeds and scored on the same n test images. A difference between them has
two sources of noise: the seeds (training randomness, which enters each arm on its own) and the test set (shared by
both arms, so it enters through the paired per-image differences). Tests that see only one source reach false-
positive rates of 14–78 % in some regimes (statistics.md §B2: McNemar on one seed pair, an image bootstrap of
seed-averaged predictions, a Welch t on per-seed scores). The two-source test adds both:

    Δ̂ = mean_s m_{A,s} − mean_s m_{B,s}
    SE² = s²(m_A)/k_A + s²(m_B)/k_B + v_T
    t = Δ̂ / SE,  ν = SE⁴ / [v_A²/(k_A − 1) + v_B²/(k_B − 1) + v_T²/(n − 1)]  (Welch–Satterthwaite)

with v_T the variance of the seed-averaged difference over test images: s²(d)/n for accuracy, where
d_i = mean_s correct_{A,s,i} − mean_s correct_{B,s,i}; for any other metric, the variance of Δ* over image-weight
vectors w ~ Multinomial(n, 1/n) shared by all runs (a paired bootstrap of the test set). The seed × image interaction
is counted twice, which makes the test slightly conservative. Holm (Scand. J. Statist. 1979) controls the
family-wise error across a study's pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import t as student_t

#: Below this many seeds in either arm a difference is reported without a verdict (1–2 degrees of freedom).
MIN_SEEDS_FOR_VERDICT = 3


def _welch(delta: float, v_a: float, v_b: float, v_t: float, k_a: int, k_b: int, n: int, level: float) -> dict:
    se = float(np.sqrt(v_a + v_b + v_t))
    parts = [(v_a, k_a - 1), (v_b, k_b - 1), (v_t, n - 1)]
    denominator = sum(v**2 / dof for v, dof in parts if dof > 0 and v > 0)
    dof = se**4 / denominator if denominator > 0 else float("inf")
    if se == 0:
        p_value = 1.0 if delta == 0 else 0.0
        t_value = 0.0 if delta == 0 else float("inf") * np.sign(delta)
    else:
        t_value = delta / se
        p_value = float(2 * student_t.sf(abs(t_value), dof))
    reach = float(student_t.ppf(0.5 + level / 2, dof)) * se if se > 0 else 0.0
    return {
        "delta": float(delta),
        "se": se,
        "df": float(dof),
        "t": float(t_value),
        "p_value": p_value,
        "ci": [float(delta - reach), float(delta + reach)],
        "v_seed_a": float(v_a),
        "v_seed_b": float(v_b),
        "v_test": float(v_t),
        "seeds": [int(k_a), int(k_b)],
        "n": int(n),
    }


def two_source_welch_accuracy(correct_a: np.ndarray, correct_b: np.ndarray, *, level: float = 0.95) -> dict:
    """The two-source paired Welch t test (module docstring) for accuracy, from per-image correctness.

    ``correct_a`` [k_A, n] and ``correct_b`` [k_B, n]: 1 where seed s of the arm got test image i right; the n
    images are the same, in the same order, for every run. Returns ``delta`` (A − B), ``se``, ``df``, ``t``,
    two-sided ``p_value``, ``ci``, the three variance terms, ``seeds`` and ``n``.

    Example (A is right on 10 more images of 200 in every seed):
        >>> base = np.zeros(200, int); base[:150] = 1
        >>> a = np.stack([np.r_[np.ones(160), np.zeros(40)]] * 3); b = np.stack([base] * 3)
        >>> r = two_source_welch_accuracy(a, b)
        >>> round(r["delta"], 3), r["p_value"] < 0.01
        (0.05, True)
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"correct_a, correct_b: expected [seeds, n] arrays on the same images, got {a.shape} and {b.shape}"
        )
    k_a, k_b, n = a.shape[0], b.shape[0], a.shape[1]
    score_a, score_b = a.mean(axis=1), b.mean(axis=1)
    v_a = float(score_a.var(ddof=1)) / k_a if k_a > 1 else 0.0
    v_b = float(score_b.var(ddof=1)) / k_b if k_b > 1 else 0.0
    d = a.mean(axis=0) - b.mean(axis=0)
    v_t = float(d.var(ddof=1)) / n if n > 1 else 0.0
    return _welch(float(score_a.mean() - score_b.mean()), v_a, v_b, v_t, k_a, k_b, n, level)


def two_source_welch(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    *,
    num_classes: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    groups: np.ndarray | None = None,
    num_groups: int = 1,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The two-source test for any metric of a confusion matrix (macro-F1, mean class accuracy, ...).

    ``pred_a`` [k_A, n] and ``pred_b`` [k_B, n] hold each run's predicted classes for the same test images
    ``y_true`` [n]; ``statistic`` maps confusion matrices [..., K, K] to the metric. The test-set term is the
    variance of Δ* under image weights w ~ Multinomial(n, 1/n) shared by all runs (one weighted bincount per run).
    With ``groups`` [n] (indices < ``num_groups``), ``statistic`` gets per-group confusion matrices [..., G, K, K]
    instead (a fairness gap: the accuracy range over groups, ...).

    Example:
        >>> from fer_bench.eval.metrics import accuracy_from_cm
        >>> y = np.repeat([0, 1], 100); b = np.stack([y.copy()] * 3); b[:, :20] = 1
        >>> a = np.stack([y.copy()] * 3); a[:, :5] = 1
        >>> r = two_source_welch(y, a, b, num_classes=2, statistic=accuracy_from_cm, n_resamples=300)
        >>> round(r["delta"], 3), r["p_value"] < 0.01
        (0.075, True)
    """
    y = np.asarray(y_true, dtype=np.int64)
    a, b = np.asarray(pred_a, dtype=np.int64), np.asarray(pred_b, dtype=np.int64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != len(y) or b.shape[1] != len(y):
        raise ValueError(f"pred_a, pred_b: expected [seeds, {len(y)}] arrays, got {a.shape} and {b.shape}")
    n = len(y)
    weights = image_weights(n, n_resamples=n_resamples, seed=seed)
    score_a, boot_a = _confusion_statistic(y, a, weights, num_classes, statistic, groups, num_groups)
    score_b, boot_b = _confusion_statistic(y, b, weights, num_classes, statistic, groups, num_groups)
    v_a = float(np.var(score_a, ddof=1)) / len(a) if len(a) > 1 else 0.0
    v_b = float(np.var(score_b, ddof=1)) / len(b) if len(b) > 1 else 0.0
    v_t = float(np.nanvar(boot_a.mean(axis=0) - boot_b.mean(axis=0), ddof=1))
    return _welch(float(score_a.mean() - score_b.mean()), v_a, v_b, v_t, len(a), len(b), n, level)


def image_weights(n: int, *, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap weights of n test images, [R, n] ~ Multinomial(n, 1/n): one row per resample, shared by every run
    scored on those images (the pairing)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def _confusion_statistic(
    y: np.ndarray,
    preds: np.ndarray,
    weights: np.ndarray,
    num_classes: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    groups: np.ndarray | None = None,
    num_groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``statistic`` of each run's confusion matrix ([runs]) and of its image-weighted copies ([runs, R])."""
    k = num_classes
    shape = (k, k) if groups is None else (num_groups, k, k)
    offset = 0 if groups is None else np.asarray(groups, dtype=np.int64) * k * k
    size = int(np.prod(shape))
    cells = offset + y[None, :] * k + preds  # [runs, n]
    observed = np.stack([np.bincount(c, minlength=size).reshape(shape) for c in cells])
    resampled = np.stack([np.stack([np.bincount(c, weights=w, minlength=size) for w in weights]) for c in cells])
    return statistic(observed), statistic(resampled.reshape(len(preds), len(weights), *shape))


def pooled_bootstrap_ci(
    y_true: np.ndarray,
    preds: np.ndarray,
    *,
    num_classes: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of an arm's seed-averaged metric when its test images are resampled: every seed's
    predictions ``preds`` [k, n] are scored under the same image weights and averaged (seeds pooled).

    It is the interval of the test-set source alone; the pair tests (:func:`two_source_welch`) add the seeds'.

    Example:
        >>> from fer_bench.eval.metrics import accuracy_from_cm
        >>> y = np.repeat([0, 1], 200); p = np.stack([y, y]); p[0, :40] = 1
        >>> low, high = pooled_bootstrap_ci(y, p, num_classes=2, statistic=accuracy_from_cm, n_resamples=500)
        >>> low < 0.95 < high
        True
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(preds, dtype=np.int64)
    weights = image_weights(len(y), n_resamples=n_resamples, seed=seed)
    _, boot = _confusion_statistic(y, p, weights, num_classes, statistic)
    pooled = np.nanmean(boot, axis=0)
    tail = (1 - level) / 2 * 100
    return float(np.nanpercentile(pooled, tail)), float(np.nanpercentile(pooled, 100 - tail))


def pooled_mean_ci(
    values: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """:func:`pooled_bootstrap_ci` for a per-image mean (``values`` [k, n]: one row per seed, e.g. correctness or
    a per-image attention cosine): the percentile interval of the seed-averaged mean under image resampling."""
    v = np.asarray(values, dtype=np.float64).mean(axis=0)
    weights = image_weights(len(v), n_resamples=n_resamples, seed=seed)
    means = weights @ v / len(v)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: sort p_(1) ≤ … ≤ p_(m); p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)).

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005])
        [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(adjusted)
    out = np.empty(m)
    out[order] = adjusted
    return [round(float(v), 12) for v in out]


def verdict(delta: float, adjusted_p: float, *, seeds: Sequence[int], alpha: float = 0.05) -> str:
    """ "A better", "B better", "no detectable difference", or "no verdict (fewer than 3 seeds)".

    Example:
        >>> verdict(0.02, 0.01, seeds=(5, 5)), verdict(0.02, 0.2, seeds=(5, 5)), verdict(0.02, 0.01, seeds=(2, 5))
        ('A better', 'no detectable difference', 'no verdict (fewer than 3 seeds)')
    """
    if min(seeds) < MIN_SEEDS_FOR_VERDICT:
        return f"no verdict (fewer than {MIN_SEEDS_FOR_VERDICT} seeds)"
    if adjusted_p > alpha:
        return "no detectable difference"
    return "A better" if delta > 0 else "B better"
