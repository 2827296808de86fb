"""The evaluator's PNG plots (matplotlib, Agg backend, written atomically): confusion matrix, reliability diagram,
accuracy and recall per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fer_bench._io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


def confusion_png(path: Path, cm: np.ndarray, label_names: list[str]) -> None:
    """The row-normalised confusion matrix, counts below each cell, as a PNG at ``path``."""
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(label_names), 0.8 + 0.7 * len(label_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title("Confusion matrix (row-normalised; counts below)")
    fig.tight_layout()
    _save(fig, path)


def reliability_png(path: Path, calibration: dict[str, Any], ece: float) -> None:
    """The reliability diagram (accuracy per confidence bin against the diagonal) as a PNG."""
    plt = _plt()
    edges = np.asarray(calibration["edges"], dtype=float)
    accuracy = np.array([np.nan if v is None else v for v in calibration["accuracy"]], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres, np.nan_to_num(accuracy), width=edges[1] - edges[0], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (15 bins), ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def group_columns_for_plots(results: dict[str, Any]) -> list[str]:
    """The group columns the group plots show: single columns (no ``a+b``), at most 6."""
    return [c for c in results["groups"] if "+" not in c][:6]


def group_accuracy_png(path: Path, results: dict[str, Any]) -> None:
    """Accuracy per group with its CI, one panel per group column, as a PNG."""
    plt = _plt()
    columns = group_columns_for_plots(results)
    fig, axes = plt.subplots(len(columns), 1, figsize=(7, 2.2 * len(columns)), squeeze=False)
    for ax, column in zip(axes[:, 0], columns, strict=True):
        table = results["groups"][column]
        names = list(table)
        acc = np.array([table[n]["acc"] for n in names], dtype=float)
        ci = [table[n]["acc_ci"] or [np.nan, np.nan] for n in names]
        low = np.array([c[0] if c[0] is not None else np.nan for c in ci], dtype=float)
        high = np.array([c[1] if c[1] is not None else np.nan for c in ci], dtype=float)
        err = np.nan_to_num(np.vstack([acc - low, high - acc]))
        colors = ["tab:blue" if table[n]["excluded_from_gaps"] is None else "lightgrey" for n in names]
        ax.bar(range(len(names)), acc, yerr=err, color=colors, capsize=3)
        ax.axhline(results["metrics"]["acc"], color="black", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(names)), [f"{n}\n(n={table[n]['n']})" for n in names], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{column}: accuracy per group, 95 % CI (grey: left out of gaps; dotted: overall)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def group_recall_png(path: Path, results: dict[str, Any]) -> None:
    """Recall per group and class as a heat map, one panel per group column, as a PNG."""
    plt = _plt()
    columns = group_columns_for_plots(results)
    classes = results["label_space"]["names"]
    height = sum(1.2 + 0.3 * len(results["groups"][c]) for c in columns)
    fig, axes = plt.subplots(len(columns), 1, figsize=(1.5 + 0.8 * len(classes), height), squeeze=False)
    for ax, column in zip(axes[:, 0], columns, strict=True):
        table = results["groups"][column]
        names = list(table)
        grid = np.array(
            [[table[n]["recall"][c] if table[n]["recall"][c] is not None else np.nan for c in classes] for n in names],
            dtype=float,
        )
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(len(names)):
            for j in range(len(classes)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{column}: recall per group and class", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
