"""Honest uncertainty for fairness gaps: bias-corrected estimates, bounded-root intervals and chance levels.

A gap such as max_g acc_g − min_g acc_g is a max − min over noisy per-group estimates. By Jensen's inequality its
plug-in estimate is biased upward (E[max r̂ − min r̂] ≥ max r − min r), worst with many or small groups, and the
bootstrap distribution of the plug-in sits above the estimate by about that bias again, so percentile intervals
often exclude their own estimate (and BCa, basic and m-out-of-n intervals miss as well; Lum, Zhang & Bower,
FAccT 2022; Fang & Santos, Rev. Econ. Stud. 2019). For every gap this module reports:

* the **plug-in** θ̂ (biased away from "no disparity": upward for gaps, downward for the worst group and the
  min/max ratio);
* the **bias-corrected** θ̃ = θ̂ − (mean θ* − θ̂), the bootstrap bias correction, kept inside the statistic's range;
* the **bounded-root interval** [L, U]. For θ = mean_c [max_g r_gc − min_g r_gc], with Z = r̂ − r:
  θ̂ − θ ≤ mean_c range_g Z_gc whatever the true rates (all groups tied is the worst case), and
  θ − θ̂ ≤ mean_c (Z_{b_c c} − Z_{a_c c}) with a_c, b_c the true extremes (tight when they are well separated).
  The bootstrap quantiles of the two roots, R_L* = mean_c range_g Z*_gc and R_U* = mean_c (Z*_{b̂c} − Z*_{âc}),
  give L = θ̂ − q_{1−α/2}(R_L*), U = θ̂ + q_{1−α/2}(R_U*): each side misses with probability ≲ α/2 for every
  configuration of true rates (the least-favourable form of Fang & Santos' directional bootstrap; Chernozhukov,
  Lee & Rosen, Econometrica 2013, on max/min bounds). Since θ* − θ̂ ≤ R_L* in every resample, θ̃ ≥ L, and θ̂ ≤ U:
  the interval contains both estimates. The worst group (a min), the min/max ratio (the same roots on
  log((correct + ½)/(n + 1))) and overall disparity (1 − mean/max per class, bounded through the same max) use
  the matching one-sided bounds; the worst group's lower bound is the smallest of the groups' own bounds, on the
  arcsine scale. Resamples keep each group's size; for equalized odds, whose K² cells are often rare or unseen,
  each (group, true class) row keeps its size and is drawn from add-½ smoothed frequencies;
* the **gap expected by chance**: the distribution of the same statistic when group membership is permuted
  (within true class for equal opportunity, equalized odds and overall disparity), drawn on counts (multivariate
  hypergeometric, or random tables with fixed margins), its median and 95th percentile, and the permutation
  p-value (1 + #{T_b at least as extreme as T}) / (B + 1) (Phipson & Smyth, 2010). The test is exact under
  exchangeability whatever the statistic's bias, since the same biased statistic is recomputed under the null.

The coverage of these intervals and the test's false-positive rate are measured by
``benchmarks/fairness_coverage.py``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import random_table

from fer_bench.eval.bootstrap import percentile_interval, resample_rows, resample_within
from fer_bench.eval.fairness import GAP_DEFINITIONS, rate_counts, rates
from fer_bench.eval.metrics import macro_f1_from_cm, nanmean

#: Threshold for "distinguishable from chance".
CHANCE_ALPHA = 0.05


def _extremes(r_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the group with the highest rate and the group with the lowest among the others ([C] each)."""
    ok = ~np.isnan(r_hat)
    high = np.where(ok, r_hat, -np.inf).argmax(axis=0)
    others = np.where(ok, r_hat, np.inf)
    others[high, np.arange(r_hat.shape[1])] = np.inf
    return high, others.argmin(axis=0)


def _take(z: np.ndarray, group: np.ndarray) -> np.ndarray:
    """z[b, group[c], c] for every replicate b and cell c: [B, G, C] → [B, C]."""
    return np.take_along_axis(z, group[None, None, :], axis=1)[:, 0, :]


def _upper(samples: np.ndarray, level: float) -> float:
    valid = samples[~np.isnan(samples)]
    return float(np.quantile(valid, 1 - (1 - level) / 2)) if valid.size else float("nan")


def _lower(samples: np.ndarray, level: float) -> float:
    valid = samples[~np.isnan(samples)]
    return float(np.quantile(valid, (1 - level) / 2)) if valid.size else float("nan")


def _smoothed_log(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """log((num + ½) / (den + 1)), NaN where den = 0: a log rate that stays finite at 0 correct."""
    return np.where(den > 0, np.log((num + 0.5) / (den + 1.0)), np.nan)


def bounded_root_interval(
    key: str, cm: np.ndarray, replicates: np.ndarray, *, level: float = 0.95, center: np.ndarray | None = None
) -> tuple[float, float]:
    """The bounded-root interval of gap ``key`` (module docstring) from groups' counts [G, K, K] and [B, G, K, K].

    ``center``: the rates [G, C] the replicates were drawn around, when not the observed ones (smoothed rows).

    Example (two groups of 200, accuracies 0.80 and 0.70; the interval covers the 0.10 gap):
        >>> from fer_bench.eval.bootstrap import resample_within
        >>> cm = np.array([[[80, 20], [20, 80]], [[70, 30], [30, 70]]])
        >>> low, high = bounded_root_interval("max_gap", cm, resample_within(cm, n_resamples=500, seed=0))
        >>> bool(0.0 <= low < 0.10 < high < 0.25)
        True
    """
    kind, functional, _ = GAP_DEFINITIONS[key]
    num, den = rate_counts(cm, kind)  # [G, C]
    num_b, den_b = rate_counts(replicates, kind)  # [B, G, C]
    value = float(functional(rates(num, den)))
    if np.isnan(value):
        return (float("nan"), float("nan"))
    if key in ("max_gap", "dem_parity_gap", "eq_opp_gap", "eq_odds_gap"):
        r_hat = rates(num, den)
        z = rates(num_b, den_b) - (r_hat if center is None else center)
        cells = (~np.isnan(r_hat)).sum(axis=0) >= 2
        z = np.where(cells, z, np.nan)
        ok = ~np.isnan(z)
        spread = np.where(ok, z, -np.inf).max(axis=1) - np.where(ok, z, np.inf).min(axis=1)
        lower_root = nanmean(np.where(ok.sum(axis=1) >= 2, spread, np.nan), axis=-1)
        high, low = _extremes(r_hat)
        upper_root = nanmean(np.where(cells, _take(z, low) - _take(z, high), np.nan), axis=-1)
        return (max(0.0, value - _upper(lower_root, level)), min(1.0, value + _upper(upper_root, level)))
    if key == "worst_group_acc":
        r_hat = rates(num, den)[:, 0]
        z = rates(num_b, den_b)[:, :, 0] - r_hat
        smallest = np.where(np.isnan(z), np.inf, z).min(axis=1)
        # θ = r_a for the true worst group a, so the smallest of the groups' own lower bounds is below θ whenever
        # a's is: no need to guess a. Each bound is taken on the arcsine scale, where a proportion's spread does
        # not depend on its value (a rate estimated too high does not also get too small a spread).
        angle = np.arcsin(np.sqrt((num[:, 0] + 0.5) / (den[:, 0] + 1.0)))  # [G]
        angles = np.arcsin(np.sqrt((num_b[:, :, 0] + 0.5) / (den_b[:, :, 0] + 1.0)))  # [B, G]
        reach = np.array([_upper(angles[:, g] - angle[g], level) for g in range(len(angle))])
        bounds = np.sin(np.clip(angle - reach, 0.0, None)) ** 2
        low = float(np.nanmin(np.where(den[:, 0] > 0, bounds, np.nan)))
        return (max(0.0, min(low, value)), min(1.0, value - _lower(smallest, level)))
    if key == "min_max_ratio":
        log_hat = _smoothed_log(num, den)  # [G, 1]
        z = (_smoothed_log(num_b, den_b) - log_hat)[:, :, 0]
        log_hat = log_hat[:, 0]
        spread_hat = float(np.nanmax(log_hat) - np.nanmin(log_hat))
        spread = np.nanmax(z, axis=1) - np.nanmin(z, axis=1)
        top = int(np.nanargmax(log_hat))
        rest = np.where(np.arange(len(log_hat)) == top, np.inf, np.nan_to_num(log_hat, nan=np.inf))
        bottom = int(rest.argmin())
        lower_log = max(0.0, spread_hat - _upper(spread, level))
        upper_log = spread_hat + _upper(z[:, bottom] - z[:, top], level)
        return (float(np.exp(-upper_log)), float(np.exp(-lower_log)))
    if key == "overall_disparity":
        r_hat = rates(num, den)  # [G, C]
        cells = ((~np.isnan(r_hat)).sum(axis=0) >= 2) & (np.nan_to_num(r_hat, nan=-1).max(axis=0) > 0)
        ratio_hat = nanmean(r_hat.T, axis=-1) / np.where(cells, np.nanmax(np.where(cells, r_hat, 1), axis=0), 1)
        log_hat = _smoothed_log(num, den)
        z = _smoothed_log(num_b, den_b) - log_hat  # [B, G, C]
        mean_hat = np.log(nanmean(np.exp(log_hat).T, axis=-1))  # [C]
        z_mean = np.log(nanmean(np.swapaxes(np.exp(log_hat + z), 1, 2), axis=-1)) - mean_hat  # [B, C]
        z_max = np.where(np.isnan(z), -np.inf, z).max(axis=1)
        high, _ = _extremes(r_hat)
        lower_root = nanmean(np.where(cells, ratio_hat * (np.exp(z_max - z_mean) - 1), np.nan), axis=-1)
        upper_root = nanmean(np.where(cells, ratio_hat * (1 - np.exp(_take(z, high) - z_mean)), np.nan), axis=-1)
        return (max(0.0, value - _upper(lower_root, level)), min(1.0, value + _upper(upper_root, level)))
    raise ValueError(f"key: expected one of {sorted(GAP_DEFINITIONS)}, got {key!r}")


def permuted_counts(cm: np.ndarray, kind: str, *, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Numerators [B, G, C] of ``kind``'s rate with group membership permuted (denominators stay fixed).

    * ``accuracy``: correct per group ~ multivariate hypergeometric(colors = n_g, draws = all correct);
    * ``recall``: the same within each true class (colors = n_{g,c});
    * ``prediction``: a random group × predicted-class table with margins (n_g, predicted totals);
    * ``confusion``: such a table within each true class.
    Each equals shuffling the group labels of the images (within true class for the last two) and recounting.
    """
    cm = np.asarray(cm, dtype=np.int64)
    g, k = cm.shape[0], cm.shape[-1]
    if kind == "accuracy":
        n = cm.sum(axis=(1, 2))
        correct = int(np.trace(cm, axis1=1, axis2=2).sum())
        return rng.multivariate_hypergeometric(n, correct, size=n_permutations)[:, :, None]
    if kind == "recall":
        support = cm.sum(axis=2)  # [G, K]
        correct = np.diagonal(cm, axis1=1, axis2=2).sum(axis=0)  # [K]
        draws = [rng.multivariate_hypergeometric(support[:, c], int(correct[c]), size=n_permutations) for c in range(k)]
        return np.stack(draws, axis=-1)
    if kind == "prediction":
        return _random_tables(cm.sum(axis=(1, 2)), cm.sum(axis=(0, 1)), n_permutations, rng)
    if kind == "confusion":
        out = np.zeros((n_permutations, g, k, k), dtype=np.int64)
        for c in range(k):
            out[:, :, c, :] = _random_tables(cm[:, c, :].sum(axis=1), cm[:, c, :].sum(axis=0), n_permutations, rng)
        return out.reshape(n_permutations, g, k * k)
    raise ValueError(f"kind: expected accuracy, prediction, recall or confusion, got {kind!r}")


def _random_tables(rows: np.ndarray, cols: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` random tables with the given margins (Patefield's algorithm), [size, len(rows), len(cols)]."""
    out = np.zeros((size, len(rows), len(cols)), dtype=np.int64)
    if rows.sum() == 0:
        return out
    keep_r, keep_c = rows > 0, cols > 0  # scipy wants positive margins; empty rows and columns stay 0
    tables = random_table(rows[keep_r], cols[keep_c]).rvs(size=size, random_state=rng)
    out[np.ix_(np.arange(size), keep_r, keep_c)] = tables
    return out


def gap_inference(
    cm_g: np.ndarray,
    *,
    eligible: np.ndarray,
    n_bootstrap: int = 1000,
    n_permutations: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    keys: tuple[str, ...] | None = None,
) -> dict[str, dict]:
    """Every fairness gap of one group column with its corrected estimate, interval and chance level.

    ``cm_g`` [G, K, K] holds per-group confusion matrices; only ``eligible`` groups enter. Returns, per gap key,
    ``value`` (plug-in), ``bias`` ("upward"/"downward"), ``corrected``, ``ci`` [L, U] (``ci_method``), and
    ``chance`` = {``median``, ``p95`` (the 95th percentile for gaps, the 5th for the worst group and the ratio),
    ``p_value``, ``n_permutations``, ``within``: within the chance band is p > 0.05}. ``fair_f1`` (a mean over
    groups, not a gap) gets a percentile interval only. Bootstrap replicates keep every group's size fixed.
    ``keys`` limits the work to some gaps (default: all of them and ``fair_f1``).

    Example (three tied groups: the plug-in gap is positive, chance explains it):
        >>> cm = np.array([[[60, 40], [40, 60]]] * 3)
        >>> out = gap_inference(cm, eligible=np.ones(3, bool), n_bootstrap=300, n_permutations=300, seed=1)
        >>> gap = out["max_gap"]
        >>> gap["value"], gap["ci"][0] <= gap["corrected"] <= gap["value"] <= gap["ci"][1], gap["chance"]["within"]
        (0.0, True, True)
    """
    cm = np.asarray(cm_g)[np.asarray(eligible, dtype=bool)]
    # Replicates keep each group's size; for P(pred | true) over all K² cells, each (group, true class) row keeps
    # its size and is drawn from smoothed frequencies, so that cells seen rarely or never still vary.
    replicates = resample_within(cm, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else None
    wanted = [key for key in GAP_DEFINITIONS if keys is None or key in keys]
    by_rows = n_bootstrap and any(GAP_DEFINITIONS[key][0] == "confusion" for key in wanted)
    row_replicates = resample_rows(cm, n_resamples=n_bootstrap, seed=seed + 1) if by_rows else None
    k = cm.shape[-1]
    rng = np.random.default_rng([seed, 1])
    null_counts: dict[str, np.ndarray] = {}
    out: dict[str, dict] = {}
    for key, (kind, functional, worse) in GAP_DEFINITIONS.items():
        if keys is not None and key not in keys:
            continue
        num, den = rate_counts(cm, kind)
        value = float(functional(rates(num, den))) if len(cm) else float("nan")
        entry: dict = {"value": value, "bias": "upward" if worse == "higher" else "downward"}
        entry |= {"corrected": None, "ci": None, "ci_method": None, "chance": None}
        if np.isnan(value):
            out[key] = entry
            continue
        if replicates is not None:
            by_row = kind == "confusion"  # K² cells per group: many are rare, some unseen
            draws = row_replicates if by_row else replicates
            center = (num + 0.5) / np.where(den > 0, den + 0.5 * k, np.nan) if by_row else rates(num, den)
            boot = functional(rates(*rate_counts(draws, kind)))
            # bias of the functional at the distribution the replicates came from
            bias = float(np.nanmean(boot)) - float(functional(center)) if np.isfinite(boot).any() else 0.0
            corrected = float(min(1.0, max(0.0, value - bias)))
            low, high = bounded_root_interval(key, cm, draws, level=level, center=center if by_row else None)
            # The roots bound the plug-in and the corrected estimate by construction (module docstring); the union
            # only matters where a resample leaves a cell empty or the ratio's smoothing shifts the log scale.
            entry |= {
                "corrected": corrected,
                "ci": [float(min(low, value, corrected)), float(max(high, value, corrected))],
                "ci_method": "bounded-root",
            }
        if n_permutations and len(cm) >= 2:
            if kind not in null_counts:
                null_counts[kind] = permuted_counts(cm, kind, n_permutations=n_permutations, rng=rng)
            null = functional(rates(null_counts[kind], den))
            null = null[~np.isnan(null)]
            tolerance = 1e-12  # equal statistics count as "at least as extreme" despite float rounding
            extreme = (null >= value - tolerance) if worse == "higher" else (null <= value + tolerance)
            p_value = float((1 + extreme.sum()) / (1 + null.size))
            band = np.quantile(null, 0.95 if worse == "higher" else 0.05) if null.size else float("nan")
            entry["chance"] = {
                "median": float(np.median(null)) if null.size else float("nan"),
                "p95": float(band),
                "p_value": p_value,
                "n_permutations": int(n_permutations),
                "within": bool(p_value > CHANCE_ALPHA),
            }
        out[key] = entry
    if keys is not None and "fair_f1" not in keys:
        return out
    fair_f1 = float(nanmean(macro_f1_from_cm(cm), axis=-1)) if len(cm) else float("nan")
    out["fair_f1"] = {"value": fair_f1, "bias": None, "corrected": None, "ci_method": "percentile", "chance": None}
    out["fair_f1"]["ci"] = (
        list(percentile_interval(nanmean(macro_f1_from_cm(replicates), axis=-1), level=level))
        if replicates is not None and len(cm)
        else None
    )
    return out
