"""``ferbench study report``: a study's runs gathered (from their folders, or from the MLflow store they share) and
compared.

Per arm and evaluation set: mean ± std over seeds and the pooled bootstrap CI (seeds averaged, test images
resampled). Per tested pair: the difference, its CI and the two-source paired Welch t test over seeds and test images
(:mod:`fer_bench.eval.significance`), Holm-adjusted across the study's pairs, and a plain-language verdict (none below
3 seeds per arm). Fairness: each group column's accuracy gap per arm, and per pair the same test on the gap (its own
Holm family). Writes ``report.md``, ``results.csv``, ``arms.png`` and ``pairs.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_bench._io import atomic_path, atomic_write_text
from fer_bench.errors import ConfigError
from fer_bench.eval.metrics import accuracy_from_cm, macro_f1_from_cm, mean_class_accuracy_from_cm
from fer_bench.eval.report import jsonable
from fer_bench.eval.significance import (
    MIN_SEEDS_FOR_VERDICT,
    holm,
    pooled_bootstrap_ci,
    pooled_mean_ci,
    two_source_welch,
    two_source_welch_accuracy,
    verdict,
)
from fer_bench.train.study import TEST_SET, Study, StudyRun, read_done, remote_runs

CONFUSION_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "acc": accuracy_from_cm,
    "mean_class_acc": mean_class_accuracy_from_cm,
    "macro_f1": macro_f1_from_cm,
}
METRIC_TITLES = {
    "acc": "accuracy",
    "mean_class_acc": "mean class accuracy",
    "macro_f1": "macro-F1",
    "att_cos": "ATT-COS",
    "detect_f1": "occlusion detection F1",
}
#: The group gap a study compares per arm: the accuracy range over a column's groups (those of at least this size).
FAIRNESS_GAP = "max_gap"
MIN_GROUP_SIZE = 30


@dataclass
class Scored:
    """One run scored on one evaluation set: its results.json and per-image predictions."""

    results: dict[str, Any]
    predictions: pd.DataFrame

    def metric(self, name: str) -> float:
        """A headline metric, ATT-COS or the occlusion detector's F1; NaN where the run has none (a detector
        scored on images without occluders has no F1)."""
        heads = self.results.get("heads") or {}
        if name == "att_cos":
            value = (heads.get("au_attention") or {}).get("att_cos")
        elif name == "detect_f1":  # only where there are occluders to find: on clean faces F1 is 0 or undefined
            detection = heads.get("occlusion_detection") or {}
            value = detection.get("f1") if detection.get("occluded_patches") else None
        else:
            value = self.results["metrics"].get(name)
        return math.nan if value is None else float(value)


@dataclass
class Gathered:
    """Every run of a study that could be found: (arm, seed) → eval set → scored, with where each came from."""

    scored: dict[tuple[str, int], dict[str, Scored]] = field(default_factory=dict)
    source: dict[tuple[str, int], str] = field(default_factory=dict)
    missing: list[tuple[str, int]] = field(default_factory=list)
    #: finished runs left out because a file of theirs cannot be used: (arm, seed) → the file and why
    unreadable: dict[tuple[str, int], str] = field(default_factory=dict)


def _eval_folder(name: str) -> str:
    return "eval" if name == TEST_SET else f"eval-{name}"


def _read_scored(folder: Path) -> tuple[Scored | None, str | None]:
    """An evaluation folder's results.json and predictions.csv, or (None, the file and what is wrong with it): missing,
    unparsable, without the metrics or columns a study compares, or a predictions table that does not hold one row
    per scored image (truncated)."""
    results_path, predictions_path = folder / "results.json", folder / "predictions.csv"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{results_path}: missing"
    except (OSError, ValueError) as exc:
        return None, f"{results_path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    metrics = results.get("metrics") if isinstance(results, dict) else None
    if not isinstance(metrics, dict) or any(m not in metrics for m in CONFUSION_METRICS):
        return None, f"{results_path}: no metrics {', '.join(CONFUSION_METRICS)} (not a fer_bench evaluation?)"
    if not isinstance((results.get("label_space") or {}).get("names"), list):
        return None, f"{results_path}: no label_space.names (not a fer_bench evaluation?)"
    try:
        predictions = pd.read_csv(predictions_path, dtype={"image_id": str}, keep_default_na=False)
    except FileNotFoundError:
        return None, f"{predictions_path}: missing"
    except (OSError, ValueError) as exc:  # pandas' parser and empty-data errors are ValueErrors
        return None, f"{predictions_path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    absent = [c for c in ("image_id", "y_true", "y_pred") if c not in predictions]
    if absent:
        return None, f"{predictions_path}: no column(s) {', '.join(absent)}"
    n = results.get("n")
    if isinstance(n, int) and len(predictions) != n:
        return None, f"{predictions_path}: {len(predictions)} rows for the {n} images results.json scored (truncated?)"
    for column in ("y_true", "y_pred"):
        values = pd.to_numeric(predictions[column], errors="coerce")
        if values.isna().any() or (values % 1 != 0).any():
            return None, f"{predictions_path}: {column} holds values that are not class indices"
    return Scored(results, predictions), None


def gather(study: Study, *, message: Callable[[str], None] = print) -> Gathered:
    """Each arm run's evaluation sets: from its folder when ``done.json`` is there, else from the finished MLflow
    run tagged with its run key (artifacts downloaded under ``<study folder>/.gathered/<run key>``)."""
    out = Gathered()
    eval_sets = study.spec.eval_sets()
    remote: dict[str, Any] | None = None
    for run in study.arm_runs:
        where = (run.arm, run.seed)
        found, problem = _local(run, eval_sets)
        source = str(run.out)
        if found is None:
            if remote is None:
                remote = remote_runs(study, message=message)
            if run.key in remote:
                found, fetched = _download(study, run, remote[run.key], eval_sets, message=message)
                problem = problem or fetched
                source = f"MLflow run {remote[run.key].info.run_id}"
        if found is None:
            if problem:
                out.unreadable[where] = problem
                message(f"{run.label}: left out of the report: {problem}")
            else:
                out.missing.append(where)
            continue
        out.scored[where], out.source[where] = found, source
    return out


def _local(run: StudyRun, eval_sets: list[str]) -> tuple[dict[str, Scored] | None, str | None]:
    """A finished run's evaluation sets from its folder; (None, None) when it has not finished there, (None, why)
    when one of its files cannot be used."""
    if read_done(run.out) is None:
        return None, None
    return _read_all(run.out, eval_sets)


def _read_all(folder: Path, eval_sets: list[str]) -> tuple[dict[str, Scored] | None, str | None]:
    found = {}
    for name in eval_sets:
        scored, problem = _read_scored(folder / _eval_folder(name))
        if scored is None:
            return None, problem
        found[name] = scored
    return found, None


def _download(
    study: Study, run: StudyRun, mlflow_run, eval_sets: list[str], *, message
) -> tuple[dict[str, Scored] | None, str | None]:
    """A finished run's evaluation folders, from the eval child runs MLflow holds under it."""
    from fer_bench.train.study import _client

    target = study.out / ".gathered" / run.key
    try:
        client = _client(study.tracking_uri)
        children = client.search_runs(
            [mlflow_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{mlflow_run.info.run_id}'"
        )
        for name in eval_sets:
            folder = _eval_folder(name)
            if (target / folder / "results.json").exists():
                continue
            for child in children:
                try:
                    client.download_artifacts(child.info.run_id, folder, str(target))
                    break
                except Exception:
                    continue
    except Exception as exc:
        message(f"{run.label}: could not fetch its results from MLflow ({type(exc).__name__}: {exc})")
        return None, None
    return _read_all(target, eval_sets)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def _aligned(study: Study, runs: list[Scored], labels: list[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(y_true [n], y_pred [runs, n], the first run's predictions) after checking every run scored the same images
    in the same order with the same labels."""
    first = runs[0].predictions
    for scored, label in zip(runs[1:], labels[1:], strict=True):
        other = scored.predictions
        if len(other) != len(first) or not (other["image_id"].to_numpy() == first["image_id"].to_numpy()).all():
            raise ConfigError(
                f"{study.path}: {label} and {labels[0]} were scored on different images; a pair test needs the same "
                "test images in the same order (same dataset, split and protocol)"
            )
        if not (other["y_true"].to_numpy() == first["y_true"].to_numpy()).all():
            raise ConfigError(f"{study.path}: {label} and {labels[0]} disagree on the true labels of the test images")
    y_true = first["y_true"].to_numpy(np.int64)
    return y_true, np.stack([s.predictions["y_pred"].to_numpy(np.int64) for s in runs]), first


def _att_values(runs: list[Scored], y_true: np.ndarray) -> np.ndarray | None:
    """Per-image attention cosines weighted so that their plain mean is ATT-COS (the mean over classes of each
    class's mean): v_i · n / (K · n_class(i)) over the images that have an AU map; [runs, n_valid]."""
    if any("att_cos" not in s.predictions for s in runs):
        return None
    values = np.stack([pd.to_numeric(s.predictions["att_cos"], errors="coerce").to_numpy(np.float64) for s in runs])
    valid = ~np.isnan(values).any(axis=0)
    if not valid.any():
        return None
    classes, counts = np.unique(y_true[valid], return_counts=True)
    weight = dict(zip(classes.tolist(), (valid.sum() / (len(classes) * counts)).tolist(), strict=True))
    return values[:, valid] * np.array([weight[c] for c in y_true[valid]])


def _num_classes(runs: list[Scored]) -> int:
    return len(runs[0].results["label_space"]["names"])


def arm_summary(
    study: Study, arm: str, eval_set: str, gathered: Gathered, *, n_resamples: int
) -> dict[str, dict[str, Any]]:
    """Per metric: the seeds' values, mean ± std and the pooled bootstrap CI (where per-image data allow)."""
    seeds = [s for s in study.spec.seeds if (arm, s) in gathered.scored]
    runs = [gathered.scored[(arm, s)][eval_set] for s in seeds]
    out: dict[str, dict[str, Any]] = {}
    if not runs:
        return out
    y_true, preds, _ = _aligned(study, runs, [f"{arm}/seed{s}" for s in seeds])
    for metric in (*CONFUSION_METRICS, "att_cos", "detect_f1"):
        values = [r.metric(metric) for r in runs]
        if all(math.isnan(v) for v in values):
            continue
        row: dict[str, Any] = {"values": values, "seeds": seeds, "mean": statistics.fmean(values)}
        row["std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        if metric in CONFUSION_METRICS:
            row["ci"] = pooled_bootstrap_ci(
                y_true,
                preds,
                num_classes=_num_classes(runs),
                statistic=CONFUSION_METRICS[metric],
                n_resamples=n_resamples,
            )
        elif metric == "att_cos":
            weighted = _att_values(runs, y_true)
            row["ci"] = pooled_mean_ci(weighted, n_resamples=n_resamples) if weighted is not None else None
        out[metric] = row
    return out


def pair_test(
    study: Study, a: str, b: str, eval_set: str, metric: str, gathered: Gathered, *, n_resamples: int
) -> dict[str, Any] | None:
    """The two-source paired Welch t test of arm ``a`` against ``b`` on ``metric`` (None when a side has no run)."""
    sides = []
    for arm in (a, b):
        seeds = [s for s in study.spec.seeds if (arm, s) in gathered.scored]
        sides.append(([gathered.scored[(arm, s)][eval_set] for s in seeds], [f"{arm}/seed{s}" for s in seeds]))
    if not sides[0][0] or not sides[1][0]:
        return None
    runs, labels = sides[0][0] + sides[1][0], sides[0][1] + sides[1][1]
    y_true, preds, _ = _aligned(study, runs, labels)
    k_a = len(sides[0][0])
    if metric == "acc":
        correct = (preds == y_true[None, :]).astype(np.float64)
        return two_source_welch_accuracy(correct[:k_a], correct[k_a:])
    if metric == "att_cos":
        values = _att_values(runs, y_true)
        if values is None:
            return None
        return two_source_welch_accuracy(values[:k_a], values[k_a:])
    return two_source_welch(
        y_true,
        preds[:k_a],
        preds[k_a:],
        num_classes=_num_classes(runs),
        statistic=CONFUSION_METRICS[metric],
        n_resamples=n_resamples,
    )


def _group_range(eligible: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Accuracy range over the eligible groups of per-group confusion matrices [..., G, K, K]."""

    def statistic(cm: np.ndarray) -> np.ndarray:
        acc = accuracy_from_cm(cm)[..., eligible]  # [..., G']
        return np.nanmax(acc, axis=-1) - np.nanmin(acc, axis=-1)

    return statistic


def group_columns(scored: Scored) -> list[str]:
    """The group columns a run's results compare (those the fairness section covers and predictions carry)."""
    return [c for c in (scored.results.get("fairness") or {}) if "+" not in c and c in scored.predictions]


def fairness_pair(
    study: Study, a: str, b: str, column: str, gathered: Gathered, *, n_resamples: int
) -> dict[str, Any] | None:
    """The two-source test of the difference in a group column's accuracy range (A − B; negative: A is fairer)."""
    sides = [
        [gathered.scored[(arm, s)][TEST_SET] for s in study.spec.seeds if (arm, s) in gathered.scored] for arm in (a, b)
    ]
    if not sides[0] or not sides[1]:
        return None
    runs = sides[0] + sides[1]
    y_true, preds, first = _aligned(study, runs, [f"{a}"] * len(sides[0]) + [f"{b}"] * len(sides[1]))
    codes, names = pd.factorize(first[column].astype(str))
    eligible = np.bincount(codes, minlength=len(names)) >= MIN_GROUP_SIZE
    if eligible.sum() < 2:
        return None
    return two_source_welch(
        y_true,
        preds[: len(sides[0])],
        preds[len(sides[0]) :],
        num_classes=_num_classes(runs),
        statistic=_group_range(eligible),
        groups=codes,
        num_groups=len(names),
        n_resamples=n_resamples,
    )


def analyse(study: Study, gathered: Gathered, *, n_resamples: int = 1000) -> dict[str, Any]:
    """Everything the report shows: per-arm summaries per evaluation set, the pair tests with Holm-adjusted p-values
    and verdicts, and the fairness gaps per arm and per pair."""
    spec = study.spec
    arms = {
        eval_set: {arm: arm_summary(study, arm, eval_set, gathered, n_resamples=n_resamples) for arm in spec.arms}
        for eval_set in spec.eval_sets()
    }
    pairs = []
    for pair in spec.pairs:
        metric = spec.pair_metric(pair)
        test = pair_test(study, pair.a, pair.b, pair.on, metric, gathered, n_resamples=n_resamples)
        row = {"a": pair.a, "b": pair.b, "on": pair.on, "metric": metric, "test": test}
        if test is None:
            why = f"no per-image {metric} in these runs (no AU maps)"
            row["reason"] = _untested(study, pair.a, pair.b, gathered, why)
        pairs.append(row)
    _adjust(pairs, alpha=spec.alpha)
    fairness: dict[str, Any] = {"arms": {}, "pairs": []}
    any_run = next(iter(gathered.scored.values()), None)
    columns = group_columns(any_run[TEST_SET]) if any_run else []
    for arm in spec.arms:
        rows = {}
        for column in columns:
            entries = [
                ((gathered.scored[(arm, s)][TEST_SET].results.get("fairness") or {}).get(column) or {}).get(
                    FAIRNESS_GAP, {}
                )
                for s in spec.seeds
                if (arm, s) in gathered.scored
            ]
            values = [e["value"] for e in entries if e.get("value") is not None]
            if values:
                # each run's bias-corrected gap and bounded-root interval (README "Fairness statistics"), averaged
                corrected = [e["corrected"] for e in entries if e.get("corrected") is not None]
                intervals = [e["ci"] for e in entries if e.get("ci")]
                rows[column] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                    "values": values,
                    "corrected": statistics.fmean(corrected) if corrected else None,
                    "ci": [statistics.fmean(c[0] for c in intervals), statistics.fmean(c[1] for c in intervals)]
                    if intervals
                    else None,
                }
        fairness["arms"][arm] = rows
    arm_pairs = list(dict.fromkeys((pair.a, pair.b) for pair in spec.pairs))  # once per pair of arms, on test
    for a, b in arm_pairs:
        for column in columns:
            test = fairness_pair(study, a, b, column, gathered, n_resamples=n_resamples)
            row = {"a": a, "b": b, "on": TEST_SET, "metric": column, "test": test}
            if test is None:
                why = f"fewer than 2 {column} groups of {MIN_GROUP_SIZE}+ test images"
                row["reason"] = _untested(study, a, b, gathered, why)
            fairness["pairs"].append(row)
    _adjust(fairness["pairs"], alpha=spec.alpha, lower_is_better=True)
    return {"arms": arms, "pairs": pairs, "fairness": fairness, "columns": columns}


def _untested(study: Study, a: str, b: str, gathered: Gathered, why: str) -> str:
    """The verdict of a pair without a test: a side without runs (not run yet, or its runs left out), else ``why``."""
    for arm in (a, b):
        if not any((arm, s) in gathered.scored for s in study.spec.seeds):
            if any(where[0] == arm for where in gathered.unreadable):
                return f"no usable run of {arm} (left out, see above)"
            return "not run yet"
    return f"not available: {why}"


def _adjust(pairs: list[dict[str, Any]], *, alpha: float, lower_is_better: bool = False) -> None:
    """Holm-adjusted p-values and verdicts across ``pairs`` (one family)."""
    tested = [p for p in pairs if p["test"] is not None]
    adjusted = holm([p["test"]["p_value"] for p in tested]) if tested else []
    for p, adj in zip(tested, adjusted, strict=True):
        p["p_holm"] = adj
        delta = -p["test"]["delta"] if lower_is_better else p["test"]["delta"]
        said = verdict(delta, adj, seeds=p["test"]["seeds"], alpha=alpha)
        p["verdict"] = said.replace("A better", f"{p['a']} better").replace("B better", f"{p['b']} better")
    for p in pairs:
        if p["test"] is None:
            p["p_holm"], p["verdict"] = None, p.pop("reason", "not run yet")


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _pm(row: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not row:
        return "—"
    std = "" if math.isnan(row["std"]) else f" ± {row['std'] * scale:.{digits}f}"
    return f"{row['mean'] * scale:.{digits}f}{std}"


def _gap_cell(row: dict[str, Any] | None) -> str:
    """A fairness gap per arm: plug-in mean ± std, then (corrected, [interval]) when the runs have them."""
    if not row:
        return "—"
    extra = f" (corr. {row['corrected'] * 100:.1f}, {_ci(row['ci'])})" if row.get("corrected") is not None else ""
    return _pm(row) + extra


def _ci(ci: Any, scale: float = 100.0, digits: int = 1) -> str:
    return f"[{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "—"


def _scale(metric: str) -> tuple[float, int, str]:
    """(scale, digits, unit) a metric is shown with: rates in %, cosines and F1 of detection as they are."""
    return (1.0, 3, "") if metric in ("att_cos", "detect_f1") else (100.0, 1, " %")


def report_markdown(study: Study, gathered: Gathered, analysis: dict[str, Any]) -> str:
    spec = study.spec
    total = len(study.arm_runs)
    lines = [
        f"# Study {spec.name}",
        "",
        f"- study file: `{study.path}`; runs in `{study.out}`; MLflow experiment `{study.experiment}` "
        f"at `{study.tracking_uri}` (parent run `study-{spec.name}`)",
        f"- arms: {', '.join(spec.arms)}; seeds: {spec.seeds}; "
        f"runs found: {len(gathered.scored)} of {total}"
        + (f" (missing: {', '.join(f'{a}/seed{s}' for a, s in gathered.missing)})" if gathered.missing else ""),
        *[f"- left out, {a}/seed{s}: {why}" for (a, s), why in gathered.unreadable.items()],
        f'- test: two-source paired Welch t over seeds and test images (README "Studies"); Holm-adjusted across '
        f"the {len(spec.pairs)} pair(s); α = {spec.alpha}; no verdict below {MIN_SEEDS_FOR_VERDICT} seeds per arm",
        "- per arm: mean ± std over seeds; pooled CI = 95 % percentile interval of the seed-averaged metric with the "
        "test images resampled (the test-set source alone; the pair tests add the seeds')",
    ]
    if study.pretrain is not None:
        lines.append(f"- every arm starts from the pretraining run's backbone: `{study.pretrain.out / 'best.pt'}`")
    lines.append("")
    if analysis["pairs"]:
        lines += ["## Pairs", "", "| A | B | on | metric | Δ (A − B) | 95 % CI | p | Holm p | verdict |"]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for p in analysis["pairs"]:
            lines.append(_pair_row(p))
        lines.append("")
    for eval_set, arms in analysis["arms"].items():
        metrics = [m for m in (*CONFUSION_METRICS, "att_cos", "detect_f1") if any(m in row for row in arms.values())]
        title = "the test split" if eval_set == TEST_SET else f"`{eval_set}`"
        lines += [f"## Arms on {title}", ""]
        header = (
            ["arm", "seeds"]
            + [f"{METRIC_TITLES[m]}{_scale(m)[2]}" for m in metrics]
            + [f"pooled CI ({METRIC_TITLES[spec.metric]})"]
        )
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm, row in arms.items():
            seeds = len(next(iter(row.values()))["values"]) if row else 0
            cells = [arm, str(seeds)] + [_pm(row.get(m), *_scale(m)[:2]) for m in metrics]
            main = row.get(spec.metric)
            cells.append(_ci(main.get("ci") if main else None, *_scale(spec.metric)[:2]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    fairness = analysis["fairness"]
    if analysis["columns"]:
        lines += [
            "## Fairness: accuracy range over groups (test split)",
            "",
            f"Max − min accuracy over the groups of each column (groups of at least {MIN_GROUP_SIZE} test images in "
            "the pair tests); lower is fairer. Plug-in mean ± std over seeds, in points; then the mean of the runs' "
            "bias-corrected gaps and of their bounded-root 95 % intervals (the plug-in is biased upwards).",
            "",
            "| arm | " + " | ".join(analysis["columns"]) + " |",
            "|---|" + "---|" * len(analysis["columns"]),
        ]
        for arm, rows in fairness["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(_gap_cell(rows.get(c)) for c in analysis["columns"]) + " |")
        lines.append("")
        if fairness["pairs"]:
            lines += [
                "Pairs (Δ = A − B of the gap; negative: A is fairer; Holm across these tests):",
                "",
                "| A | B | on | column | Δ gap (A − B) | 95 % CI | p | Holm p | verdict |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for p in fairness["pairs"]:
                lines.append(_pair_row(p, fairer=True))
            lines.append("")
    lines += [
        "## Runs",
        "",
        "| arm | seed | " + " | ".join(f"{e} {spec.metric}" for e in spec.eval_sets()) + " | source |",
        "|---|---|" + "---|" * (len(spec.eval_sets()) + 1),
    ]
    for (arm, seed), sets in sorted(
        gathered.scored.items(), key=lambda item: (list(spec.arms).index(item[0][0]), item[0][1])
    ):
        scale, digits, _ = _scale(spec.metric)
        values = [sets[e].metric(spec.metric) for e in spec.eval_sets()]
        cells = ["—" if math.isnan(v) else f"{v * scale:.{digits}f}" for v in values]
        lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + f" | {gathered.source[(arm, seed)]} |")
    return "\n".join(lines) + "\n"


def _pair_row(p: dict[str, Any], *, fairer: bool = False) -> str:
    test = p["test"]
    if test is None:
        return f"| {p['a']} | {p['b']} | {p['on']} | {p['metric']} | — | — | — | — | {p['verdict']} |"
    scale, digits, _ = (100.0, 1, "") if fairer else _scale(p["metric"])
    verdict_text = p["verdict"]
    if fairer:
        verdict_text = verdict_text.replace(" better", " fairer")
    return (
        f"| {p['a']} | {p['b']} | {p['on']} | {p['metric']} | {test['delta'] * scale:+.{digits}f} | "
        f"{_ci(test['ci'], scale, digits)} | {test['p_value']:.3g} | {p['p_holm']:.3g} | **{verdict_text}** |"
    )


def results_rows(study: Study, gathered: Gathered) -> list[dict[str, Any]]:
    """One row per (arm, seed, evaluation set): run key, source and every metric."""
    rows = []
    for (arm, seed), sets in gathered.scored.items():
        run = study.run(arm, seed)
        for eval_set, scored in sets.items():
            row: dict[str, Any] = {"arm": arm, "seed": seed, "eval_set": eval_set, "run_key": run.key}
            for metric in (*CONFUSION_METRICS, "att_cos", "detect_f1"):
                row[metric] = scored.metric(metric)
            for column in group_columns(scored) if eval_set == TEST_SET else []:
                row[f"{column}_{FAIRNESS_GAP}"] = scored.results["fairness"][column][FAIRNESS_GAP]["value"]
            row["n"] = scored.results.get("n")
            row["source"] = gathered.source[(arm, seed)]
            rows.append(row)
    return rows


def _plots(study: Study, analysis: dict[str, Any], out: Path) -> dict[str, Path]:
    from fer_bench.eval.plots import _plt

    plt = _plt()
    paths = {}
    panels = sorted({(p["on"], p["metric"]) for p in analysis["pairs"]} or {(TEST_SET, study.spec.metric)})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (eval_set, metric) in zip(axes[0], panels, strict=True):
        scale = _scale(metric)[0]
        arms = [a for a, row in analysis["arms"][eval_set].items() if metric in row]
        for i, arm in enumerate(arms):
            row = analysis["arms"][eval_set][arm][metric]
            ax.scatter([i] * len(row["values"]), np.array(row["values"]) * scale, s=14, color="0.55", zorder=2)
            ci = row.get("ci")
            if ci:
                ax.errorbar(
                    [i],
                    [row["mean"] * scale],
                    yerr=[[(row["mean"] - ci[0]) * scale], [(ci[1] - row["mean"]) * scale]],
                    fmt="o",
                    color="C0",
                    capsize=4,
                    zorder=3,
                )
            else:
                ax.plot([i], [row["mean"] * scale], "o", color="C0", zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(f"{METRIC_TITLES[metric]} on {eval_set}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("seeds (grey) and mean with pooled 95 % CI", fontsize=9)
    fig.tight_layout()
    paths["arms"] = out / "arms.png"
    with atomic_path(paths["arms"]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tested = [p for p in analysis["pairs"] if p["test"] is not None]
    if tested:
        # one panel per unit: points of a rate, a cosine as it is (one x axis would mix them)
        units = {}
        for p in tested:
            units.setdefault("cosine" if _scale(p["metric"])[0] == 1.0 else "points", []).append(p)
        fig, axes = plt.subplots(
            len(units),
            1,
            figsize=(6.6, 0.6 * len(tested) + 1.1 * len(units)),
            squeeze=False,
            gridspec_kw={"height_ratios": [len(group) for group in units.values()]},
        )
        for ax, (unit, group) in zip(axes[:, 0], units.items(), strict=True):
            scale = 1.0 if unit == "cosine" else 100.0
            for i, p in enumerate(group):
                delta, (low, high) = p["test"]["delta"], p["test"]["ci"]
                ax.errorbar(
                    [delta * scale],
                    [i],
                    xerr=[[(delta - low) * scale], [(high - delta) * scale]],
                    fmt="o",
                    color="C3" if p["verdict"].endswith("better") else "C0",
                    capsize=4,
                )
            ax.axvline(0, color="0.4", lw=1)
            ax.set_ylim(-0.6, len(group) - 0.4)
            ax.set_yticks(
                range(len(group)), [f"{p['a']} − {p['b']}\n{p['metric']} on {p['on']}" for p in group], fontsize=8
            )
            ax.set_xlabel(f"A − B ({unit}), 95 % CI: seeds + test images; red: a verdict", fontsize=8)
        fig.tight_layout()
        paths["pairs"] = out / "pairs.png"
        with atomic_path(paths["pairs"]) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    return paths


def write_study_report(
    study: Study, *, out: Path | None = None, n_resamples: int = 1000, message: Callable[[str], None] = print
) -> dict[str, Path]:
    """Gather the study's runs, compare them and write report.md, results.csv, results.json and the plots into
    ``out`` (default: the study's folder); returns their paths.

    Raises:
        ConfigError: no finished run yet, runs of a pair scored on different images, or ``out`` not writable.
    """
    gathered = gather(study, message=message)
    if not gathered.scored:
        left = f" ({len(gathered.unreadable)} finished run(s) left out: their files are unusable, see above)"
        raise ConfigError(
            f"{study.path}: no finished run of study {study.spec.name!r} in {study.out} or in MLflow at "
            f"{study.tracking_uri}{left if gathered.unreadable else ''}; run it first: ferbench study run {study.path}"
        )
    analysis = analyse(study, gathered, n_resamples=n_resamples)
    out = Path(out or study.out)
    paths = {"report": out / "report.md", "csv": out / "results.csv", "json": out / "results.json"}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths["report"], report_markdown(study, gathered, analysis))
        atomic_write_text(paths["csv"], pd.DataFrame(results_rows(study, gathered)).to_csv(index=False))
        atomic_write_text(paths["json"], json.dumps(jsonable(analysis), indent=2, allow_nan=False) + "\n")
        paths |= _plots(study, analysis, out)
    except OSError as exc:
        raise ConfigError(
            f"{out}: the report cannot be written there ({exc.strerror or type(exc).__name__}); give --report-dir DIR"
        ) from None
    return paths
