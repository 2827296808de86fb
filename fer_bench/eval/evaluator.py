"""The evaluator: score predictions on a dataset split and write ``results.json``, ``report.md`` and a confusion
matrix PNG. Metrics come from :mod:`fer_bench.eval.metrics`; this module only gathers and reports them."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fer_bench import __version__
from fer_bench._io import atomic_path, atomic_write_text
from fer_bench.data import DatasetInfo, FaceDataset, create_transform, dataset_hash, get_label_space
from fer_bench.data.labels import list_label_spaces
from fer_bench.errors import ConfigError
from fer_bench.eval import metrics as M
from fer_bench.models import FerModel

RESULTS_SCHEMA_VERSION = 1


@torch.no_grad()
def predict(
    model: FerModel,
    dataset: FaceDataset,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress=None,
) -> np.ndarray:
    """Class probabilities [N, K] (float64) of ``model`` on every item of ``dataset``, in order."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs = []
    for batch in loader:
        logits = model(batch["image"].to(device))["logits"].float()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
        if progress:
            progress(len(batch["label"]))
    return np.concatenate(probs) if probs else np.zeros((0, model.num_classes))


def compute_results(
    *,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    label_names: tuple[str, ...],
    rows: pd.DataFrame | None = None,
    group_columns: tuple[str, ...] = (),
    subset_columns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """All metrics of one prediction set as a JSON-ready dict (no I/O)."""
    k = len(label_names)
    per_class = M.per_class_precision_recall_f1(y_true, y_pred, k)
    results: dict[str, Any] = {
        "n": int(len(y_true)),
        "metrics": {
            "acc": M.accuracy_score(y_true, y_pred),
            "mean_class_acc": M.mean_class_accuracy_score(y_true, y_pred, k),
            "macro_f1": M.macro_f1_score(y_true, y_pred, k),
        },
        "per_class": {
            name: {
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(per_class["support"][i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": M.confusion_matrix(y_true, y_pred, k).tolist(),
        "groups": {},
        "subsets": {},
    }
    if rows is not None:
        for column in group_columns:
            if column in rows.columns:
                values = rows[column].fillna("unknown").astype(str).to_numpy()
                results["groups"][column] = M.group_accuracy(y_true, y_pred, values)
        for column in subset_columns:
            if column in rows.columns:
                mask = rows[column].fillna(False).astype(bool).to_numpy()
                if mask.any():  # e.g. RAF-DB's RAN subsets exist only when the user supplied the lists
                    results["subsets"][column] = M.group_accuracy(y_true, y_pred, np.where(mask, "true", "false"))
    return results


def label_alignment(model_names: tuple[str, ...], dataset_names: tuple[str, ...]) -> dict[str, Any]:
    """How a model's classes meet a dataset's: the shared classes (in dataset order) are scored; model classes the
    dataset lacks have their logits masked; dataset rows of classes the model lacks are dropped.

    Example:
        >>> a = label_alignment(("neutral", "anger", "contempt"), ("neutral", "anger"))
        >>> a["scored"], a["masked_logits"], a["dropped_classes"]
        (['neutral', 'anger'], ['contempt'], [])
    """
    scored = [n for n in dataset_names if n in model_names]
    if not scored:
        raise ConfigError(
            f"the model predicts {list(model_names)} and the dataset uses {list(dataset_names)}: no class in common"
        )
    return {
        "scored": scored,
        "masked_logits": [n for n in model_names if n not in dataset_names],
        "dropped_classes": [n for n in dataset_names if n not in model_names],
    }


def _space_name(names: list[str], dataset_space) -> str:
    if tuple(names) == tuple(dataset_space.names):
        return dataset_space.name
    for candidate in list_label_spaces():
        if tuple(get_label_space(candidate).names) == tuple(names):
            return candidate
    return "shared"


def evaluate(
    model: FerModel,
    info: DatasetInfo,
    *,
    split: str,
    img_size: int,
    label_names: tuple[str, ...],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Run ``model`` on ``split`` of ``info`` and return the results dict (see :func:`compute_results`).

    ``label_names`` are the model's classes. When they differ from the dataset's, scoring goes through the
    canonical names (:func:`label_alignment`): a 7-class model on an 8-class dataset drops the contempt rows, an
    8-class model on a 7-class dataset has its contempt logit masked; ``cross_dataset`` in the result says which.
    """
    model_names, dataset_names = tuple(label_names), tuple(info.label_space.names)
    rows = info.split(split)
    cross = None
    if model_names != dataset_names:
        if not info.label_space.canonical:
            raise ConfigError(
                f"dataset {info.name!r} uses its own taxonomy {list(dataset_names)}; only a model trained on it "
                f"can be scored on it (the model predicts {list(model_names)})"
            )
        alignment = label_alignment(model_names, dataset_names)
        keep = rows["label"].map(lambda i: dataset_names[i] in alignment["scored"]).to_numpy(bool)
        dropped = rows.loc[~keep, "label"].map(lambda i: dataset_names[i]).value_counts()
        cross = {
            "model_classes": list(model_names),
            "dataset_classes": list(dataset_names),
            "scored_classes": alignment["scored"],
            "masked_logits": alignment["masked_logits"],
            "dropped_rows": {str(k): int(v) for k, v in dropped.items()},
        }
        rows = rows[keep].reset_index(drop=True)
        scored = alignment["scored"]
    else:
        scored = list(dataset_names)
    dataset = FaceDataset.from_info(info, split, transform=create_transform(train=False, img_size=img_size), rows=rows)
    probs = predict(model, dataset, batch_size=batch_size, device=device, workers=workers, progress=progress)
    # Columns of the scored classes, in dataset order: masking a logit = leaving its column out of the argmax.
    probs = probs[:, [model_names.index(n) for n in scored]]
    y_true = rows["label"].map(lambda i: scored.index(dataset_names[i])).to_numpy(np.int64)
    y_pred = probs.argmax(axis=1)
    results = compute_results(
        y_true=y_true,
        y_pred=y_pred,
        label_names=tuple(scored),
        rows=rows,
        group_columns=info.group_columns,
        subset_columns=info.subset_columns,
    )
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "dataset": info.name,
        "layout": info.layout,
        "protocol": info.protocol,
        "split": split,
        "label_space": {"name": _space_name(scored, info.label_space), "names": scored},
        "cross_dataset": cross,
        "dataset_hash": dataset_hash(rows["image_id"].tolist(), y_true),
        **results,
        "config": {"img_size": img_size, "test_time": "resize to img_size, no flip averaging"},
        "fer_bench_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _confusion_png(path: Path, cm: np.ndarray, label_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}\n{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_title("Confusion matrix (row-normalised; counts below)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _cross_dataset_lines(cross: dict[str, Any] | None) -> list[str]:
    if not cross:
        return []
    lines = [
        f"- cross-dataset: the model predicts {len(cross['model_classes'])} classes, the dataset has "
        f"{len(cross['dataset_classes'])}; scored on the {len(cross['scored_classes'])} shared canonical classes"
    ]
    if cross["masked_logits"]:
        lines.append(f"- masked model logits (not in the dataset): {', '.join(cross['masked_logits'])}")
    if cross["dropped_rows"]:
        dropped = ", ".join(f"{k} {v}" for k, v in cross["dropped_rows"].items())
        lines.append(f"- dropped dataset rows (class not predicted by the model): {dropped}")
    return lines


def _report_md(results: dict[str, Any]) -> str:
    m = results["metrics"]
    names = results["label_space"]["names"]
    lines = [
        f"# Evaluation: {results['dataset']} / {results['split']}",
        "",
        f"- checkpoint: `{results.get('checkpoint', '-')}`",
        f"- protocol: {results.get('protocol') or '-'} (layout: {results.get('layout', '-')})",
        f"- label space: {results['label_space']['name']} ({', '.join(names)})",
        f"- images: {results['n']}; dataset hash `{results['dataset_hash'][:16]}…`",
        f"- fer_bench {results['fer_bench_version']}, {results['created']}",
        *_cross_dataset_lines(results.get("cross_dataset")),
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {m['acc']:.4f} |",
        f"| mean class accuracy | {m['mean_class_acc']:.4f} |",
        f"| macro-F1 | {m['macro_f1']:.4f} |",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["per_class"].items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predictions. See `confusion_matrix.png`.",
        "",
        "| true \\ pred | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for name, row in zip(names, results["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    for title, key in (("Accuracy per group", "groups"), ("Accuracy per subset", "subsets")):
        if results[key]:
            lines += ["", f"## {title}", "", "| column | value | n | accuracy |", "|---|---|---|---|"]
            for column, table in results[key].items():
                for value, r in table.items():
                    lines.append(f"| {column} | {value} | {r['n']} | {r['acc']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and confusion_matrix.png into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "confusion": out / "confusion_matrix.png"}
    atomic_write_text(paths["results"], json.dumps(results, indent=2, allow_nan=True) + "\n")
    atomic_write_text(paths["report"], _report_md(results))
    _confusion_png(paths["confusion"], np.asarray(results["confusion_matrix"]), results["label_space"]["names"])
    return paths
