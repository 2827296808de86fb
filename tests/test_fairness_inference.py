"""Fairness-gap inference: intervals contain their estimates, bias corrections go the right way, chance levels."""

from __future__ import annotations

import numpy as np
import pytest

from fer_bench.eval.bootstrap import percentile_interval, resample_within
from fer_bench.eval.fairness import GAP_DEFINITIONS, gap_value, rate_counts, rates
from fer_bench.eval.fairness_inference import gap_inference, permuted_counts

GAPS = tuple(GAP_DEFINITIONS)


def _groups(rng: np.random.Generator, sizes, accuracies, k: int = 7) -> np.ndarray:
    """Per-group confusion counts [G, K, K]: classes equally likely, errors spread evenly."""
    out = []
    for n, acc in zip(sizes, accuracies, strict=True):
        p = np.full((k, k), (1 - acc) / (k - 1))
        np.fill_diagonal(p, acc)
        out.append(rng.multinomial(n, (p / k).ravel()).reshape(k, k))
    return np.stack(out)


@pytest.mark.parametrize("seed", range(6))
def test_every_interval_contains_the_plug_in_and_the_corrected_estimate(seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(2, 13))
    cm = _groups(rng, rng.integers(30, 600, groups), rng.uniform(0.4, 0.9, groups))
    out = gap_inference(cm, eligible=np.ones(groups, bool), n_bootstrap=300, n_permutations=200, seed=seed)
    for key in GAPS:
        entry = out[key]
        low, high = entry["ci"]
        assert low <= entry["corrected"] <= high and low <= entry["value"] <= high, (key, entry)
        assert entry["ci_method"] == "bounded-root"


def test_bias_corrections_move_towards_no_disparity_when_groups_tie():
    cm = _groups(np.random.default_rng(0), [150] * 12, [0.7] * 12)
    out = gap_inference(cm, eligible=np.ones(12, bool), n_bootstrap=400, n_permutations=0, seed=0)
    for key in ("max_gap", "dem_parity_gap", "eq_opp_gap", "eq_odds_gap", "overall_disparity"):
        assert out[key]["bias"] == "upward"
        assert out[key]["corrected"] < out[key]["value"], key
    for key in ("worst_group_acc", "min_max_ratio"):
        assert out[key]["bias"] == "downward"
        assert out[key]["corrected"] > out[key]["value"], key


def test_percentile_interval_misses_the_estimate_where_the_bounded_root_does_not():
    """The quickstart symptom (issue 12): with many tied groups the percentile interval sits above θ̂."""
    cm = _groups(np.random.default_rng(3), [100] * 24, [0.75] * 24)
    replicates = resample_within(cm, n_resamples=500, seed=0)
    value = float(gap_value(cm, "max_gap"))
    boot = GAP_DEFINITIONS["max_gap"][1](rates(*rate_counts(replicates, "accuracy")))
    assert percentile_interval(boot)[0] > value  # the old interval excludes its estimate
    out = gap_inference(cm, eligible=np.ones(24, bool), n_bootstrap=500, n_permutations=300, seed=0)
    low, high = out["max_gap"]["ci"]
    assert low <= value <= high and low == 0.0  # and it reaches the truth, 0
    assert out["max_gap"]["chance"]["within"]


def test_a_real_disparity_is_distinguishable_from_chance():
    cm = _groups(np.random.default_rng(1), [400, 400, 400], [0.8, 0.8, 0.55])
    out = gap_inference(cm, eligible=np.ones(3, bool), n_bootstrap=300, n_permutations=500, seed=0)
    for key in ("max_gap", "worst_group_acc", "min_max_ratio", "eq_opp_gap"):
        chance = out[key]["chance"]
        assert chance["p_value"] < 0.01 and not chance["within"], key
        assert chance["p_value"] >= 1 / 501  # never 0 (Phipson & Smyth)
    assert out["max_gap"]["value"] > out["max_gap"]["chance"]["p95"]
    assert out["worst_group_acc"]["value"] < out["worst_group_acc"]["chance"]["p95"]  # the 5th percentile for a min
    assert out["max_gap"]["ci"][0] > 0.1


def test_permutation_test_false_positive_rate_at_no_disparity_is_at_most_alpha():
    rng = np.random.default_rng(7)
    rejected = []
    for rep in range(150):
        cm = _groups(rng, [60, 120, 240, 90], [0.7] * 4, k=3)
        out = gap_inference(
            cm, eligible=np.ones(4, bool), n_bootstrap=0, n_permutations=200, seed=rep, keys=("max_gap", "eq_opp_gap")
        )
        rejected.append([out[key]["chance"]["p_value"] <= 0.05 for key in ("max_gap", "eq_opp_gap")])
    rate = np.mean(rejected, axis=0)
    assert (rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 150) + 0.01).all(), rate  # α + 2 Monte Carlo SE (+ slack)


def test_permuted_counts_keep_the_margins_that_the_null_fixes():
    cm = _groups(np.random.default_rng(2), [50, 80, 120], [0.6, 0.7, 0.8], k=4)
    rng = np.random.default_rng(0)
    acc = permuted_counts(cm, "accuracy", n_permutations=50, rng=rng)[:, :, 0]
    assert (acc.sum(axis=1) == np.trace(cm, axis1=1, axis2=2).sum()).all()
    assert (acc <= cm.sum(axis=(1, 2))).all()
    recall = permuted_counts(cm, "recall", n_permutations=50, rng=rng)  # within true class
    assert (recall.sum(axis=1) == np.diagonal(cm, axis1=1, axis2=2).sum(axis=0)).all()
    assert (recall <= cm.sum(axis=2)).all()
    predicted = permuted_counts(cm, "prediction", n_permutations=50, rng=rng)
    assert (predicted.sum(axis=2) == cm.sum(axis=(1, 2))).all() and (predicted.sum(axis=1) == cm.sum(axis=(0, 1))).all()
    confusion = permuted_counts(cm, "confusion", n_permutations=50, rng=rng).reshape(50, 3, 4, 4)
    assert (confusion.sum(axis=3) == cm.sum(axis=2)).all()  # each group keeps its true-class counts
    assert (confusion.sum(axis=1) == cm.sum(axis=0)).all()  # each (true, pred) cell total is kept


def test_permutation_on_counts_matches_shuffling_group_labels():
    """The count sampler is the label shuffle: the null mean of the accuracy gap agrees with a row-level shuffle."""
    rng = np.random.default_rng(4)
    n = [40, 60, 100]
    y = rng.integers(0, 3, sum(n))
    pred = np.where(rng.random(sum(n)) < 0.7, y, rng.integers(0, 3, sum(n)))
    group = np.repeat(np.arange(3), n)
    shuffled = []
    for _ in range(1500):
        g = rng.permutation(group)
        acc = np.array([(y[g == i] == pred[g == i]).mean() for i in range(3)])
        shuffled.append(acc.max() - acc.min())
    cm = np.stack([np.bincount(y[group == i] * 3 + pred[group == i], minlength=9).reshape(3, 3) for i in range(3)])
    counts = permuted_counts(cm, "accuracy", n_permutations=3000, rng=np.random.default_rng(0))
    drawn = GAP_DEFINITIONS["max_gap"][1](rates(counts, np.array(n, float)[None, :, None]))
    assert np.mean(drawn) == pytest.approx(np.mean(shuffled), abs=0.005)
    assert np.quantile(drawn, 0.95) == pytest.approx(np.quantile(shuffled, 0.95), abs=0.01)


def test_bounded_root_covers_where_the_percentile_interval_fails():
    """A small seeded coverage check (the full one is benchmarks/fairness_coverage.py)."""
    rng = np.random.default_rng(11)
    truth_acc = [0.75] * 8
    covered, percentile_covered = [], []
    for rep in range(60):
        cm = _groups(rng, [150] * 8, truth_acc, k=2)
        out = gap_inference(cm, eligible=np.ones(8, bool), n_bootstrap=300, n_permutations=0, seed=rep)
        covered.append(out["max_gap"]["ci"][0] <= 0.0)
        boot = GAP_DEFINITIONS["max_gap"][1](
            rates(*rate_counts(resample_within(cm, n_resamples=300, seed=rep), "accuracy"))
        )
        percentile_covered.append(percentile_interval(boot)[0] <= 0.0)
    assert np.mean(covered) >= 0.9 and np.mean(percentile_covered) <= 0.1


def test_ineligible_groups_and_degenerate_columns():
    cm = _groups(np.random.default_rng(5), [200, 10, 200], [0.8, 0.1, 0.8])
    out = gap_inference(cm, eligible=np.array([True, False, True]), n_bootstrap=100, n_permutations=100, seed=0)
    assert out["worst_group_acc"]["value"] > 0.5  # the tiny group is left out
    single = gap_inference(cm[:1], eligible=np.array([True]), n_bootstrap=50, n_permutations=50, seed=0)
    assert np.isnan(single["max_gap"]["value"]) and single["max_gap"]["ci"] is None
    assert single["max_gap"]["chance"] is None
    off = gap_inference(cm, eligible=np.ones(3, bool), n_bootstrap=0, n_permutations=0, seed=0)
    assert off["max_gap"]["ci"] is None and off["max_gap"]["chance"] is None and off["max_gap"]["value"] > 0


def test_report_fairness_tables_hold_their_estimates_and_show_chance(tmp_path):
    """Done-when of issue 12: no interval in the report excludes its estimate; the chance level is shown and used."""
    import re

    import pandas as pd

    from fer_bench.eval import compute_results
    from fer_bench.eval.report import _report_md

    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, 7, n)
    tied = rng.choice(["a", "b", "c", "d", "e"], n)
    skewed = rng.choice(["x", "y", "z"], n)
    correct = rng.random(n) < np.where(skewed == "z", 0.5, 0.8)
    pred = np.where(correct, y, (y + rng.integers(1, 7, n)) % 7)
    results = compute_results(
        y_true=y,
        y_pred=pred,
        label_names=tuple("abcdefg"),
        rows=pd.DataFrame({"tied": tied, "skewed": skewed}),
        group_columns=("tied", "skewed"),
        n_bootstrap=300,
    )
    results |= {"label_space": {"name": "t", "names": list("abcdefg")}, "dataset": "t", "split": "test"}
    results |= {"dataset_hash": "0" * 64, "config": {}, "fer_bench_version": "0", "created": "now"}
    text = _report_md(results)
    rows = [line for line in text.splitlines() if re.match(r"\| (max accuracy gap|equal opportunity gap) ", line)]
    assert len(rows) == 6  # tied, skewed, tied+skewed
    for line in text.splitlines():
        match = re.match(r"\| [^|]+ \| ([\d.]+)(?: \(biased [↑↓]\))? \| ([\d.]+|–) \| \[([\d.]+), ([\d.]+)\]", line)
        if match:
            value, corrected, low, high = match.groups()
            assert float(low) <= float(value) <= float(high), line
            if corrected != "–":
                assert float(low) <= float(corrected) <= float(high), line
    tied_gap = next(line for line in text.split("### Gaps across tied ")[1].splitlines() if "max accuracy gap" in line)
    skewed_gap = next(line for line in text.split("### Gaps across skewed ")[1].splitlines() if "max accuracy" in line)
    assert tied_gap.endswith("| not distinguishable from chance |")
    assert skewed_gap.endswith("| beyond chance |")
    assert "by chance: median (95th pct)" in text
