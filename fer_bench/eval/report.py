"""The evaluator's outputs on disk: ``results.json`` (strict JSON), ``report.md`` and the plots
(:mod:`fer_bench.eval.plots`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fer_bench._io import atomic_write_text
from fer_bench.eval.plots import (
    confusion_png,
    group_accuracy_png,
    group_columns_for_plots,
    group_recall_png,
    reliability_png,
)
from fer_bench.eval.results import FAIRNESS_KEYS, HEADLINE, PER_IMAGE


def jsonable(value: Any) -> Any:
    """NaN and inf become null (strict JSON); numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci_text(ci: list | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


GAP_LABELS = {
    "worst_group_acc": "worst-group accuracy",
    "max_gap": "max accuracy gap",
    "min_max_ratio": "min/max accuracy ratio",
    "fair_f1": "fair F1 (mean over groups; not a gap)",
    "dem_parity_gap": "demographic parity gap",
    "eq_opp_gap": "equal opportunity gap",
    "eq_odds_gap": "equalized odds gap",
    "overall_disparity": "overall disparity",
}


def _gap_row(key: str, gap: dict) -> str:
    """One row of a fairness table: estimates, interval, chance level and what it means."""
    arrow = {"upward": " (biased ↑)", "downward": " (biased ↓)"}.get(gap.get("bias") or "", "")
    chance = gap.get("chance")
    if chance:
        pct = "95th" if gap.get("bias") == "upward" else "5th"
        by_chance = f"{_fmt(chance['median'])} ({pct} {_fmt(chance['p95'])})"
        p_text = f"{chance['p_value']:.3f}"
        verdict = "not distinguishable from chance" if chance["within"] else "beyond chance"
    else:
        by_chance, p_text, verdict = "–", "–", ""
    return (
        f"| {GAP_LABELS.get(key, key)} | {_fmt(gap['value'])}{arrow if gap.get('value') is not None else ''} | "
        f"{_fmt(gap.get('corrected'))} | {_ci_text(gap.get('ci'))} | {by_chance} | {p_text} | {verdict} |"
    )


def _protocol_lines(protocol: dict | None) -> list[str]:
    if not protocol:
        return []
    return [
        f"- protocol: {protocol['name']} v{protocol['version']} — {protocol.get('description') or protocol['name']}"
    ]


def _faces_lines(faces: dict | None) -> list[str]:
    if not faces:
        return []
    source = f"{faces['detector']} landmarks" if faces.get("landmarks") == "detector" else "the dataset's landmarks"
    line = f"- faces: aligned to {faces['template']} ({source})"
    dropped = faces.get("dropped") or {}
    if dropped:
        counts = ", ".join(f"{k} {v}" for k, v in dropped.items())
        line += f"; **{sum(dropped.values())} image(s) of this split dropped** ({counts}): the scores cover the rest"
    return [line]


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
    m, ci = results["metrics"], results.get("ci") or {}
    names = results["label_space"]["names"]
    protocol = results.get("protocol") or {}
    boot = results.get("bootstrap", {})
    lines = [
        f"# Evaluation: {protocol.get('name', results['dataset'])} / {results['split']}",
        "",
        *_protocol_lines(protocol),
        f"- dataset: {results['dataset']} ({results.get('layout') or 'layout not recorded'})"
        + (f"; splits: {results['dataset_splits']}" if results.get("dataset_splits") else ""),
        f"- checkpoint / predictions: `{results.get('checkpoint') or results.get('predictions') or '-'}`",
        f"- label space: {results['label_space']['name']} ({', '.join(names)})",
        f"- images: {results['n']}; dataset hash `{results['dataset_hash'][:16]}…`",
        f"- test time: {results['config'].get('test_time', '-')}, TTA {results['config'].get('tta', 'none')}"
        + (f", perturbation {results['config']['perturb']}" if results["config"].get("perturb") else ""),
        f"- fer_bench {results['fer_bench_version']} (git {str(results.get('git_sha', '-'))[:10]}), "
        f"{results['created']}",
        *_head_lines(results["config"].get("heads")),
        *_faces_lines(results.get("faces")),
        *_cross_dataset_lines(results.get("cross_dataset")),
        "",
        f"| metric | value | 95 % CI ({boot.get('n_resamples', 0)} bootstrap resamples, seed {boot.get('seed')}) |",
        "|---|---|---|",
    ]
    labels = {
        "acc": "accuracy",
        "mean_class_acc": "mean class accuracy (balanced)",
        "macro_f1": "macro-F1",
        "weighted_f1": "weighted F1",
        "top2_acc": "top-2 accuracy",
        "nll": "NLL",
        "brier": "Brier score",
        "ece": "ECE (15 bins)",
    }
    for key, label in labels.items():
        if key in m:
            lines.append(f"| {label} | {_fmt(m[key])} | {_ci_text(ci.get(key))} |")
    for name, values in (results.get("heads") or {}).items():
        lines += ["", f"## Head metrics: {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in values.items()]
    if results.get("robustness"):
        rob = results["robustness"]
        lines += [
            "",
            f"## Robustness: {rob['perturbation']} (seed {rob['seed']})",
            "",
            "| metric | clean | perturbed | drop |",
            "|---|---|---|---|",
        ]
        for key in HEADLINE:
            lines.append(f"| {labels[key]} | {_fmt(rob['clean'][key])} | {_fmt(m[key])} | {_fmt(rob['drop'][key])} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, r in results["per_class"].items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predictions (`confusion_matrix.png`).",
        "",
        "| true \\ pred | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for name, row in zip(names, results["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if results["groups"]:
        lines += [
            "",
            "## Fairness",
            "",
            f"Groups with fewer than {results.get('min_group_size', 30)} images, and unknown/unsure values, are "
            "shown in the tables but left out of every gap. Gaps are max − min across groups (parity gaps: means over "
            "classes of max − min of per-group rates). A max − min over noisy group estimates is biased upward (and "
            "the worst group and min/max ratio downward), so each gap shows the plug-in, a bias-corrected estimate, "
            "a 95 % bounded-root interval that contains both, and the gap expected by chance alone: the median of "
            "the same statistic with group membership permuted (within true class for equal opportunity, "
            "equalized odds and overall disparity), its 95th percentile (5th where lower is worse) and the "
            "permutation p-value. Each p-value is for one gap on its own: across the many gaps, columns and "
            'intersections of a report, about 1 in 20 with no real disparity still reads "beyond chance" '
            '(README, "Fairness").',
        ]
        for column, f in results["fairness"].items():
            lines += [
                "",
                f"### Gaps across {column} ({len(f['groups_compared'])} groups compared)",
                "",
                "| gap | plug-in | bias-corrected | 95 % interval | by chance: median (95th pct) | p | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [_gap_row(key, f[key]) for key in FAIRNESS_KEYS if key in f]
        for column, table in results["groups"].items():
            if "+" in column:
                continue
            lines += [
                "",
                f"### {column}",
                "",
                "| group | n | acc (95 % CI) | mean class acc | macro-F1 | note |",
                "|---|---|---|---|---|---|",
            ]
            for value, r in table.items():
                lines.append(
                    f"| {value} | {r['n']} | {_fmt(r['acc'])} {_ci_text(r['acc_ci'])} | "
                    f"{_fmt(r['mean_class_acc'])} | {_fmt(r['macro_f1'])} | {r['excluded_from_gaps'] or ''} |"
                )
        lines += [
            "",
            "## Dataset bias of the scored rows",
            "",
            "| column | effective groups | evenness | Cramér's V (group × label) | largest residual |",
            "|---|---|---|---|---|",
        ]
        for column, b in results["dataset_bias"].items():
            residuals = [
                (abs(v), g, c, v)
                for g, row in b["residuals"].items()
                for c, v in row.items()
                if v is not None and math.isfinite(v)
            ]
            top = max(residuals) if residuals else None
            worst = f"{top[1]} / {top[2]}: {top[3]:+.2f}" if top else "–"
            lines.append(
                f"| {column} | {_fmt(b['effective_groups'], 2)} | {_fmt(b['evenness'], 3)} | "
                f"{_fmt(b['cramers_v'], 3)} | {worst} |"
            )
    if results.get("dataset_bias_train"):
        lines += [
            "",
            "## Dataset bias of the training split",
            "",
            "Stereotypical bias here (a high Cramér's V) is what a model can learn as a shortcut.",
            "",
            "| column | n | effective groups | evenness | Cramér's V (group × label) |",
            "|---|---|---|---|---|",
        ]
        for column, b in results["dataset_bias_train"].items():
            lines.append(
                f"| {column} | {b['n']} | {_fmt(b['effective_groups'], 2)} | {_fmt(b['evenness'], 3)} | "
                f"{_fmt(b['cramers_v'], 3)} |"
            )
    if results["subsets"]:
        lines += ["", "## Accuracy per subset", "", "| subset | in subset | n | accuracy |", "|---|---|---|---|"]
        for column, table in results["subsets"].items():
            for value, r in table.items():
                lines.append(f"| {column} | {value} | {r['n']} | {r['acc']:.4f} |")
    return "\n".join(lines) + "\n"


def _head_lines(heads: dict | None) -> list[str]:
    """One report line per model head with its effective settings (e.g. whether anchors correct at test time)."""
    return [
        f"- head {name}: " + ", ".join(f"{key} {value}" for key, value in settings.items())
        for name, settings in (heads or {}).items()
    ]


def predictions_csv(per_image: dict[str, list]) -> str:
    """The text of ``predictions.csv``: one row per scored image, in the scored order, with the columns of the
    per-image record (``image_id``, ``y_true``, ``y_pred``, group and subset columns, then head values such as
    ``att_cos``; a missing number is ``nan``).

    Example:
        >>> record = {"image_id": ["a", "b"], "y_true": [0, 1], "y_pred": [0, 0], "att_cos": [0.5, float("nan")]}
        >>> predictions_csv(record)
        'image_id,y_true,y_pred,att_cos\\na,0,0,0.5\\nb,1,0,nan\\n'
    """
    import csv
    import io

    columns = list(per_image)
    lengths = {column: len(values) for column, values in per_image.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-image columns of different lengths: {lengths}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*(per_image[c] for c in columns), strict=True))
    return buffer.getvalue()


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md, the PNG plots and (when the results carry the per-image record,
    ``results["per_image"]``) predictions.csv into ``out_dir`` (atomically); return their paths.

    The per-image record goes to predictions.csv only, never into results.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_image = results.get(PER_IMAGE)
    results = jsonable({key: value for key, value in results.items() if key != PER_IMAGE})
    paths = {"results": out / "results.json", "report": out / "report.md", "confusion": out / "confusion_matrix.png"}
    if per_image:
        paths["predictions"] = out / "predictions.csv"
        atomic_write_text(paths["predictions"], predictions_csv(per_image))
    atomic_write_text(paths["results"], json.dumps(results, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["report"], _report_md(results))
    confusion_png(paths["confusion"], np.asarray(results["confusion_matrix"]), results["label_space"]["names"])
    if results.get("calibration"):
        paths["reliability"] = out / "reliability.png"
        reliability_png(paths["reliability"], results["calibration"], results["metrics"]["ece"])
    if group_columns_for_plots(results):
        paths["group_accuracy"] = out / "group_accuracy.png"
        group_accuracy_png(paths["group_accuracy"], results)
        paths["group_recall"] = out / "group_recall.png"
        group_recall_png(paths["group_recall"], results)
    return paths
