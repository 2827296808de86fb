"""Full evaluator report on 100,000 synthetic predictions: every metric, 3 group columns (+ their 3 pairwise
intersections), 1,000 bootstrap resamples for the headline CIs and for every fairness gap. Target: <= 5 s on 2 cores.

Baseline, in the same process: the same headline metrics and per-group metrics recomputed with scikit-learn and
fairlearn's MetricFrame on index-resampled rows, in a Python loop (run for --baseline-resamples and extrapolated to
1,000, said so in the output), as a ratio.

    .venv/bin/python benchmarks/eval_speed.py [--n 100000] [--bootstrap 1000] [--baseline-resamples 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from fer_bench.eval import compute_results


def synthetic(n: int, k: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rows = pd.DataFrame(
        {
            "gender": rng.choice(["male", "female", "unsure"], n, p=[0.48, 0.48, 0.04]),
            "race": rng.choice(["caucasian", "african_american", "asian"], n, p=[0.7, 0.1, 0.2]),
            "age": rng.choice(["0-3", "4-19", "20-39", "40-69", "70+"], n, p=[0.05, 0.2, 0.5, 0.2, 0.05]),
        }
    )
    return y, probs, rows


def baseline(y, pred, rows, resamples: int, seed: int = 0) -> float:
    from fairlearn.metrics import MetricFrame
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    metrics = {
        "acc": skm.accuracy_score,
        "bal": skm.balanced_accuracy_score,
        "f1": lambda t, p: skm.f1_score(t, p, average="macro"),
    }
    t0 = time.perf_counter()
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        t, p = y[idx], pred[idx]
        for fn in metrics.values():
            fn(t, p)
        for column in rows.columns:
            MetricFrame(metrics=metrics, y_true=t, y_pred=p, sensitive_features=rows[column].to_numpy()[idx])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--baseline-resamples", type=int, default=20)
    args = parser.parse_args()
    y, probs, rows = synthetic(args.n)
    names = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
    t0 = time.perf_counter()
    results = compute_results(
        y_true=y,
        probs=probs,
        label_names=names,
        rows=rows,
        group_columns=("gender", "race", "age"),
        n_bootstrap=args.bootstrap,
        seed=0,
    )
    ours = time.perf_counter() - t0
    columns = len(results["fairness"])
    print(
        f"fer_bench full report: {args.n:,} predictions, {columns} group columns (3 + 3 intersections), "
        f"{args.bootstrap} bootstrap resamples for headline CIs and every gap: {ours:.2f} s "
        f"(target <= 5 s) -> {'MET' if ours <= 5 else 'MISSED'}"
    )
    base = baseline(y, probs.argmax(1), rows, args.baseline_resamples)
    projected = base / args.baseline_resamples * args.bootstrap
    print(
        f"scikit-learn + fairlearn MetricFrame loop (headline + per-group acc / balanced acc / macro-F1 for the 3 "
        f"columns, no intersections, no gaps): {base:.1f} s for {args.baseline_resamples} resamples -> "
        f"{projected:.0f} s projected for {args.bootstrap}; fer_bench is x{projected / ours:.0f} faster while "
        f"computing more"
    )


if __name__ == "__main__":
    main()
