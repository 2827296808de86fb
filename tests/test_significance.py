"""The study test: two-source paired Welch t, Holm's correction and the verdicts, on seeded simulations."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
from scipy.stats import ttest_ind

from fer_bench.eval.metrics import accuracy_from_cm, macro_f1_from_cm
from fer_bench.eval.significance import holm, two_source_welch, two_source_welch_accuracy, verdict


def _arms(rng, *, k: int, n: int, effect: float, sigma_seed: float, sigma_affinity: float):
    """statistics.md §B5: shared image difficulty, arm-specific image affinity, seed shifts, run noise."""
    difficulty = rng.normal(0, 1.5, n)
    out = []
    for mean in (effect, 0.0):
        affinity = rng.normal(0, sigma_affinity, n)
        seeds = rng.normal(mean, sigma_seed, (k, 1))
        noise = rng.normal(0, 0.6, (k, n))
        out.append((2.2 + difficulty + affinity + seeds + noise > 0).astype(int))
    return out


@pytest.mark.parametrize(
    ("regime", "sigma_seed", "sigma_affinity"), [("seed", 0.15, 0.0), ("test set", 0.0, 0.8), ("mixed", 0.06, 0.5)]
)
def test_false_positive_rate_at_no_difference_is_at_most_alpha(regime, sigma_seed, sigma_affinity):
    rng = np.random.default_rng(zlib.crc32(regime.encode()))
    reps, rejected, seed_only = 600, 0, 0
    for _ in range(reps):
        a, b = _arms(rng, k=3, n=500, effect=0.0, sigma_seed=sigma_seed, sigma_affinity=sigma_affinity)
        rejected += two_source_welch_accuracy(a, b)["p_value"] <= 0.05
        if regime == "test set":
            with warnings.catch_warnings():  # identical per-seed scores now and then: scipy's precision-loss note
                warnings.simplefilter("ignore", RuntimeWarning)
                seed_only += ttest_ind(a.mean(axis=1), b.mean(axis=1), equal_var=False).pvalue <= 0.05
    assert rejected / reps <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps), (regime, rejected / reps)
    if regime == "test set":  # the negative control: seeds alone miss the shared test-set noise
        assert seed_only / reps > 0.10  # statistics.md §B2: 0.14 at k = 3


def test_a_real_difference_is_detected():
    rng = np.random.default_rng(1)
    hits = [
        two_source_welch_accuracy(*_arms(rng, k=5, n=3000, effect=0.2, sigma_seed=0.06, sigma_affinity=0.5))["p_value"]
        <= 0.05
        for _ in range(60)
    ]
    assert np.mean(hits) >= 0.8


def test_the_metric_version_agrees_with_the_accuracy_version():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 800)
    wrong = lambda p: (y + rng.integers(1, 4, 800)) % 4  # noqa: E731
    pred_a = np.stack([np.where(rng.random(800) < 0.8, y, wrong(0)) for _ in range(4)])
    pred_b = np.stack([np.where(rng.random(800) < 0.75, y, wrong(0)) for _ in range(3)])
    exact = two_source_welch_accuracy(pred_a == y, pred_b == y)
    boot = two_source_welch(y, pred_a, pred_b, num_classes=4, statistic=accuracy_from_cm, n_resamples=400)
    assert boot["delta"] == pytest.approx(exact["delta"])
    assert boot["v_test"] == pytest.approx(exact["v_test"], rel=0.2)
    assert boot["se"] == pytest.approx(exact["se"], rel=0.1)
    f1 = two_source_welch(y, pred_a, pred_b, num_classes=4, statistic=macro_f1_from_cm, n_resamples=200)
    assert f1["delta"] > 0 and f1["ci"][0] < f1["delta"] < f1["ci"][1] and f1["seeds"] == [4, 3]


def test_holm_by_hand_and_verdicts():
    # m = 3: sorted 0.01, 0.02, 0.04 -> 0.03, 0.04, 0.04 (monotone), back in the input order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    assert verdict(-0.01, 0.001, seeds=(5, 5)) == "B better"
    assert verdict(0.03, 0.049, seeds=(3, 3)) == "A better"
    assert verdict(0.03, 0.051, seeds=(3, 3)) == "no detectable difference"
    assert verdict(0.03, 0.0, seeds=(3, 2)).startswith("no verdict")


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same images"):
        two_source_welch_accuracy(np.ones((3, 10)), np.ones((3, 11)))
    with pytest.raises(ValueError, match=r"\[seeds, 5\]"):
        two_source_welch(np.zeros(5), np.zeros((2, 4)), np.zeros((2, 5)), num_classes=2, statistic=accuracy_from_cm)
