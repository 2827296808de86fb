"""End to end on SynthFER: an injected group bias shows up as a fairness gap (with a CI) that unbiased predictions
do not have, in the printed summary, results.json, report.md, the plots and the MLflow run."""

from __future__ import annotations

import csv
import json

import numpy as np
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.data import get_dataset

runner = CliRunner()


def _predictions(root, path, *, wrong) -> None:
    info = get_dataset("synthfer", root)
    rows = info.split("test")
    names = info.label_space.names
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "prediction"])
        for i, row in enumerate(rows.itertuples()):
            label = int(row.label)
            predicted = (label + 1) % len(names) if wrong(i, row) else label
            writer.writerow([row.image_id, names[predicted]])


def _eval(root, predictions, out, tracking):
    args = [
        "eval",
        "--dataset",
        "synthfer",
        "--root",
        str(root),
        "--predictions",
        str(predictions),
        "--out",
        str(out),
        "--min-group-size",
        "5",
        "--bootstrap",
        "400",
        "--tracking-uri",
        tracking,
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "results.json").read_text())


def test_injected_bias_is_reported_and_balanced_predictions_show_none(tiny_synthfer, tmp_path):
    info = get_dataset("synthfer", tiny_synthfer)
    hair = info.split("test")["hair"].to_numpy()
    target = max(set(hair), key=list(hair).count)  # the largest hair group gets every prediction wrong
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    biased, balanced = tmp_path / "biased.csv", tmp_path / "balanced.csv"
    _predictions(tiny_synthfer, biased, wrong=lambda i, row: row.hair == target)
    _predictions(tiny_synthfer, balanced, wrong=lambda i, row: i % 4 == 0)  # 25 % errors, spread evenly
    text, results = _eval(tiny_synthfer, biased, tmp_path / "ev_biased", tracking)
    _, control = _eval(tiny_synthfer, balanced, tmp_path / "ev_balanced", tracking)

    gap = results["fairness"]["hair"]["max_gap"]
    assert gap["value"] == 1.0 and gap["ci"][0] > 0.5  # the target group is always wrong, the others always right
    assert results["fairness"]["hair"]["worst_group_acc"]["value"] == 0.0
    assert control["fairness"]["hair"]["max_gap"]["value"] < 0.5
    assert control["fairness"]["hair"]["max_gap"]["ci"][0] < gap["ci"][0]
    low, high = results["ci"]["acc"]
    assert low <= results["metrics"]["acc"] <= high
    # printed, reported and plotted
    assert "fairness hair: worst-group acc 0.0000, max gap 1.0000" in text and "95 % CI" in text
    report = (tmp_path / "ev_biased" / "report.md").read_text()
    assert "## Fairness" in report and "| hair |" in report and "### hair" in report
    for plot in ("confusion_matrix.png", "group_accuracy.png", "group_recall.png"):
        assert (tmp_path / "ev_biased" / plot).stat().st_size > 1000
    # and the MLflow run holds the same figures under flat names
    import mlflow

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["fer_bench"], output_format="pandas")
    gaps = sorted(runs["metrics.test/fair/hair/max_gap"].dropna().tolist())
    assert gaps[-1] == 1.0 and gaps[0] < 0.5
    logged = sorted(runs["metrics.test/acc"].dropna().tolist())
    assert np.allclose(logged, sorted([results["metrics"]["acc"], control["metrics"]["acc"]]))
    assert any(c.startswith(f"metrics.test/group/hair:{target}/acc") for c in runs.columns)


def test_training_split_bias_injection_is_measured(tiny_synthfer, tmp_path):
    """SynthFER's --bias ties skin tone to the label in the training split; the evaluator's dataset-bias figures
    show it (Cramér's V near 1) where the balanced split has none to speak of."""
    from fer_bench.data import SynthFERConfig, generate_synthfer
    from fer_bench.eval.results import train_split_bias

    biased_root = tmp_path / "biased"
    generate_synthfer(
        out=biased_root, config=SynthFERConfig(seed=3, size=32, n_train=96, n_val=8, n_test=8, bias=1.0), workers=1
    )
    biased = train_split_bias(get_dataset("synthfer", biased_root), ("skin_tone", "hair"))
    balanced = train_split_bias(get_dataset("synthfer", tiny_synthfer), ("skin_tone", "hair"))
    assert biased["skin_tone"]["cramers_v"] > 0.9
    assert balanced["skin_tone"]["cramers_v"] < 0.45 and biased["hair"]["cramers_v"] < 0.45
