"""The evaluator's metrics against scikit-learn and fairlearn, the bootstrap, calibration and the fairness figures."""

from __future__ import annotations

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from fer_bench.eval import bootstrap as B
from fer_bench.eval import compute_results
from fer_bench.eval import fairness as F
from fer_bench.eval import metrics as M

predictions = st.integers(min_value=1, max_value=6).flatmap(
    lambda k: st.tuples(
        st.just(k),
        st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=120),
        st.integers(0, 2**16),
    )
)


@settings(max_examples=60, deadline=None)
@given(predictions)
def test_metrics_match_sklearn_including_edge_cases(data):
    """Random predictions, including a class never predicted, a class absent from the truth and a single class."""
    k, pairs, seed = data
    y_true = np.array([p[0] for p in pairs])
    y_pred = np.array([p[1] for p in pairs])
    labels = list(range(k))
    np.testing.assert_allclose(
        M.weighted_f1_score(y_true, y_pred, k),
        skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
    )
    present = sorted(set(y_true) | set(y_pred))
    np.testing.assert_allclose(
        M.macro_f1_score(y_true, y_pred, k), skm.f1_score(y_true, y_pred, labels=present, average="macro")
    )
    if len(set(y_true)) > 0:
        np.testing.assert_allclose(
            M.mean_class_accuracy_score(y_true, y_pred, k), skm.balanced_accuracy_score(y_true, y_pred)
        )
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(max(k, 2)), size=len(y_true))
    kk = probs.shape[1]
    np.testing.assert_allclose(M.nll(y_true, probs), skm.log_loss(y_true, probs, labels=list(range(kk))))
    if kk > 2:
        np.testing.assert_allclose(
            M.top_k_accuracy(y_true, probs, 2), skm.top_k_accuracy_score(y_true, probs, k=2, labels=list(range(kk)))
        )
    onehot = np.eye(kk)[y_true]
    np.testing.assert_allclose(M.brier_score(y_true, probs), ((probs - onehot) ** 2).sum(1).mean())


def test_ece_hand_computed():
    # bin (0.6, 0.667]: 2 samples at 0.62 and 0.65, 1 right -> |0.5 - 0.635| = 0.135, weight 2/4
    # bin (0.933, 1]: 2 samples at 0.95, both right -> |1 - 0.95| = 0.05, weight 2/4
    probs = np.array([[0.62, 0.38], [0.65, 0.35], [0.95, 0.05], [0.05, 0.95]])
    y = np.array([0, 1, 0, 1])
    assert M.expected_calibration_error(y, probs, 15) == pytest.approx(0.5 * 0.135 + 0.5 * 0.05)


def test_per_group_metrics_match_fairlearn_metric_frame():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 400)
    y_pred = np.where(rng.random(400) < 0.6, y_true, rng.integers(0, 5, 400))
    groups = rng.choice(["a", "b", "c"], 400)
    frame = MetricFrame(
        metrics={
            "acc": skm.accuracy_score,
            "bal": skm.balanced_accuracy_score,
            "f1": lambda t, p: skm.f1_score(t, p, average="macro"),
        },
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=groups,
    )
    res = compute_results(
        y_true=y_true,
        y_pred=y_pred,
        label_names=tuple("vwxyz"),
        rows=__import__("pandas").DataFrame({"g": groups}),
        group_columns=("g",),
        n_bootstrap=0,
        min_group_size=1,
    )
    for value, row in res["groups"]["g"].items():
        assert row["acc"] == pytest.approx(frame.by_group.loc[value, "acc"])
        assert row["mean_class_acc"] == pytest.approx(frame.by_group.loc[value, "bal"])
        assert row["macro_f1"] == pytest.approx(frame.by_group.loc[value, "f1"])
    assert res["fairness"]["g"]["max_gap"]["value"] == pytest.approx(frame.difference()["acc"])
    assert res["fairness"]["g"]["worst_group_acc"]["value"] == pytest.approx(frame.group_min()["acc"])


def test_multiclass_gaps_on_hand_computed_confusions():
    # group A: recall (1.0, 0.5, 1.0); group B: recall (0.5, 0.5, 0.0)
    a = np.array([[4, 0, 0], [2, 2, 0], [0, 0, 4]])
    b = np.array([[2, 2, 0], [0, 2, 2], [4, 0, 0]])
    gaps = F.fairness_gaps(np.stack([a, b]), np.array([True, True]))
    assert gaps["eq_opp_gap"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # predicted-class distribution: A (6, 2, 4)/12, B (6, 4, 2)/12 -> ranges (0, 2/12, 2/12)
    assert gaps["dem_parity_gap"] == pytest.approx((0 + 2 / 12 + 2 / 12) / 3)
    # row-normalised cells differ: row 0 (0.5, 0.5, 0), row 1 (0.5, 0, 0.5), row 2 (1, 0, 1) -> mean of 9 cells
    assert gaps["eq_odds_gap"] == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0 + 0.5 + 1 + 0 + 1) / 9)
    # disparity per class: mean_g (1 - r_g / max r): class 0 (0, 0.5)/2, class 1 (0, 0), class 2 (0, 1)/2
    assert gaps["overall_disparity"] == pytest.approx((0.25 + 0 + 0.5) / 3)
    assert gaps["worst_group_acc"] == pytest.approx(4 / 12) and gaps["max_gap"] == pytest.approx(10 / 12 - 4 / 12)
    # an ineligible group leaves the gaps
    alone = F.fairness_gaps(np.stack([a, b]), np.array([True, False]))
    assert np.isnan(alone["max_gap"]) and alone["worst_group_acc"] == pytest.approx(10 / 12)


def test_dataset_bias_balanced_and_fully_stereotyped():
    groups = np.repeat(np.arange(3), 30)
    balanced = F.dataset_bias(groups, np.tile(np.arange(3), 30), num_groups=3, num_classes=3)
    assert balanced["cramers_v"] == pytest.approx(0.0) and balanced["evenness"] == pytest.approx(1.0)
    assert balanced["effective_groups"] == pytest.approx(3.0)
    stereotyped = F.dataset_bias(groups, groups, num_groups=3, num_classes=3)
    assert stereotyped["cramers_v"] == pytest.approx(1.0)
    assert stereotyped["residuals"][0, 0] > 0 > stereotyped["residuals"][0, 1]
    skewed = F.dataset_bias(np.array([0] * 90 + [1] * 10), np.zeros(100, int), num_groups=2, num_classes=2)
    assert skewed["evenness"] < 0.5


def test_bootstrap_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 2000)
    pred = np.where(rng.random(2000) < 0.7, y, rng.integers(0, 7, 2000))
    one = compute_results(y_true=y, y_pred=pred, label_names=tuple("abcdefg"), n_bootstrap=500, seed=3)
    two = compute_results(y_true=y, y_pred=pred, label_names=tuple("abcdefg"), n_bootstrap=500, seed=3)
    other = compute_results(y_true=y, y_pred=pred, label_names=tuple("abcdefg"), n_bootstrap=500, seed=4)
    for key in ("acc", "mean_class_acc", "macro_f1"):
        low, high = one["ci"][key]
        assert low <= one["metrics"][key] <= high and high - low < 0.06
    assert one["ci"] == two["ci"] and one["ci"] != other["ci"]
    # the multinomial shortcut gives the same spread as resampling rows
    idx = np.random.default_rng(0).integers(0, 2000, (500, 2000))
    row_accs = (y[idx] == pred[idx]).mean(axis=1)
    assert np.std(row_accs) == pytest.approx(
        np.std(M.accuracy_from_cm(B.resample_counts(M.confusion_matrix(y, pred, 7), n_resamples=500, seed=0))),
        rel=0.15,
    )


def test_paired_bootstrap_test():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 1000)
    good = np.where(rng.random(1000) < 0.8, y, rng.integers(0, 4, 1000))
    bad = np.where(rng.random(1000) < 0.6, y, rng.integers(0, 4, 1000))
    better = B.paired_bootstrap_test(y, good, bad, num_classes=4, statistic=M.accuracy_from_cm, seed=0)
    assert better["delta"] > 0.1 and better["p_value"] < 0.01 and better["ci_low"] > 0
    same = B.paired_bootstrap_test(y, good, good, num_classes=4, statistic=M.accuracy_from_cm, seed=0)
    assert same["delta"] == 0 and same["p_value"] == 1.0
