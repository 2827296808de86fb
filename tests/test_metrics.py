"""Metrics equal scikit-learn's on the same predictions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from fer_bench.eval import compute_results
from fer_bench.eval import metrics as M


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=2, max_value=8).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=200),
        )
    )
)
def test_metrics_match_sklearn(data):
    k, pairs = data
    y_true = np.array([p[0] for p in pairs])
    y_pred = np.array([p[1] for p in pairs])
    labels = list(range(k))
    assert M.accuracy_score(y_true, y_pred) == skm.accuracy_score(y_true, y_pred)
    np.testing.assert_array_equal(
        M.confusion_matrix(y_true, y_pred, k), skm.confusion_matrix(y_true, y_pred, labels=labels)
    )
    r = M.per_class_precision_recall_f1(y_true, y_pred, k)
    p, rc, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(r["precision"], p)
    np.testing.assert_allclose(r["recall"], rc)
    np.testing.assert_allclose(r["f1"], f)
    np.testing.assert_array_equal(r["support"], s)
    np.testing.assert_allclose(M.macro_f1_score(y_true, y_pred, k), skm.f1_score(y_true, y_pred, average="macro"))
    np.testing.assert_allclose(
        M.mean_class_accuracy_score(y_true, y_pred, k), skm.balanced_accuracy_score(y_true, y_pred)
    )


def test_group_and_subset_accuracy():
    import pandas as pd

    rows = pd.DataFrame({"race": ["a", "a", "b", None], "occluded": [True, False, False, True]})
    res = compute_results(
        y_true=np.array([0, 1, 1, 0]),
        y_pred=np.array([0, 0, 1, 1]),
        label_names=("neutral", "happiness"),
        rows=rows,
        group_columns=("race",),
        subset_columns=("occluded",),
    )
    table = res["groups"]["race"]
    assert {v: (r["n"], r["acc"]) for v, r in table.items()} == {"a": (2, 0.5), "b": (1, 1.0), "unknown": (1, 0.0)}
    assert table["unknown"]["excluded_from_gaps"].startswith("not a comparable group")
    assert res["subsets"]["occluded"]["true"] == {"n": 2, "acc": 0.5}
    assert res["metrics"]["acc"] == 0.5
