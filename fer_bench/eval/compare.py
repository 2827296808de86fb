"""Compare runs from an MLflow store: a ranked table with CIs and fairness columns, and a plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from fer_bench._io import atomic_path
from fer_bench.errors import ConfigError
from fer_bench.eval.protocols import PROTOCOLS


def compare_runs(
    *,
    tracking_uri: str,
    experiment: str | None = None,
    dataset: str | None = None,
    metric: str = "acc",
    split: str = "test",
) -> pd.DataFrame:
    """Finished runs with ``<split>/<metric>``, best first, via ``mlflow.search_runs``. A training run's evaluation
    (its child run, ``kind=eval``) is listed once, as the training run; ``ferbench eval``'s own runs are listed.

    Columns: run_id, run_name, experiment, experiment_id, dataset, backbone, the metric with its CI, mean class
    accuracy, macro-F1, ECE, and the largest fairness gaps across group columns (max group gap, equal-opportunity gap).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.tracking.MlflowClient()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise ConfigError(f"--experiment {experiment!r}: not in {tracking_uri}; experiments there: {names}")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    if not experiments:
        return pd.DataFrame()
    filters = ["attributes.status = 'FINISHED'"]
    if dataset:  # a protocol name (affectnet7) selects runs scored under it; a dataset name (affectnet) all of them
        key = "protocol" if dataset in PROTOCOLS and PROTOCOLS.get(dataset).dataset != dataset else "dataset"
        filters.append(f"tags.{key} = '{dataset}'")
    runs = mlflow.search_runs(
        experiment_ids=[e.experiment_id for e in experiments],
        filter_string=" and ".join(filters),
        output_format="pandas",
    )
    column = f"metrics.{split}/{metric}"
    if runs.empty or column not in runs.columns:
        return pd.DataFrame()
    runs = runs[runs[column].notna()]
    if "tags.mlflow.parentRunId" in runs.columns:
        # a training run's evaluation is its child run with the same figures: the training run's row stands for both
        repeated = runs["tags.mlflow.parentRunId"].isin(set(runs["run_id"])) & (_column(runs, "tags.kind") == "eval")
        runs = runs[~repeated]
    names = {e.experiment_id: e.name for e in experiments}

    def col(name: str) -> pd.Series:
        return _column(runs, name)

    def worst(suffix: str) -> tuple[pd.Series, pd.Series]:
        """The largest gap over group columns, and which group column it is (``metrics.test/fair/<col>/<gap>``)."""
        cols = [c for c in runs.columns if c.startswith(f"metrics.{split}/fair/") and c.endswith(suffix)]
        if not cols:
            empty = pd.Series([math.nan] * len(runs), index=runs.index)
            return empty, pd.Series([""] * len(runs), index=runs.index)
        values = runs[cols]
        where = values.fillna(-math.inf).idxmax(axis=1).map(lambda c: c.split("/fair/", 1)[1].rsplit("/", 1)[0])
        return values.max(axis=1), where.where(values.notna().any(axis=1), "")

    max_gap, max_gap_column = worst("/max_gap")
    eq_opp, eq_opp_column = worst("/eq_opp_gap")

    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": col("tags.mlflow.runName"),
            "experiment": runs["experiment_id"].map(names),
            "experiment_id": runs["experiment_id"],
            "dataset": col("tags.dataset"),
            "protocol": col("tags.protocol"),
            "backbone": col("tags.backbone"),
            metric: runs[column],
            f"{metric}_ci_low": col(f"metrics.{split}/{metric}_ci_low"),
            f"{metric}_ci_high": col(f"metrics.{split}/{metric}_ci_high"),
            "mean_class_acc": col(f"metrics.{split}/mean_class_acc"),
            "macro_f1": col(f"metrics.{split}/macro_f1"),
            "ece": col(f"metrics.{split}/ece"),
            "max_group_gap": max_gap,
            "max_group_gap_column": max_gap_column,
            "eq_opp_gap": eq_opp,
            "eq_opp_gap_column": eq_opp_column,
        }
    )
    ascending = metric in ("ece", "nll", "brier")
    return table.sort_values(metric, ascending=ascending).reset_index(drop=True)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or a column of NaN where MLflow returned no such column (no run has that tag or metric)."""
    return frame[name] if name in frame.columns else pd.Series([math.nan] * len(frame), index=frame.index)


def comparison_plot(table: pd.DataFrame, *, metric: str, path: str | os.PathLike) -> Path:
    """Horizontal bars of ``metric`` per run with their 95 % CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r.run_name or r.run_id[:8]} ({r.experiment})" for r in table.itertuples()]
    values = table[metric].to_numpy(dtype=float)
    low = table[f"{metric}_ci_low"].to_numpy(dtype=float)
    high = table[f"{metric}_ci_high"].to_numpy(dtype=float)
    err = np.nan_to_num(np.vstack([values - low, high - values]))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(table)))
    ax.barh(range(len(table)), values, xerr=err, capsize=3, color="tab:blue")
    ax.set_yticks(range(len(table)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (95 % bootstrap CI)")
    ax.set_title("fer_bench runs")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
