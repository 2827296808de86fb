"""What MLflow's UI shows of fer_bench runs (issue 12, "MLflow dashboards"): experiments are model-training ones, runs
name their dataset splits (the runs table's Dataset column), and a training run's evaluation is its child run.

Real sqlite stores and a tiny SynthFER training, read back with MlflowClient.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.data import dataset_hash, get_dataset
from fer_bench.train import fit, recipe_from_dict
from fer_bench.train.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    Tracker,
    runs_page_url,
    split_input,
)
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def _inputs(run) -> dict[str, object]:
    """context -> the MLflow dataset of a run's inputs."""
    return {
        {t.key: t.value for t in item.tags}["mlflow.data.context"]: item.dataset for item in run.inputs.dataset_inputs
    }


def test_training_records_its_splits_and_its_evaluation_as_a_child_run(tiny_synthfer, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    # an experiment made before fer_bench tagged its experiments gets the tag when a run lands in it
    client.create_experiment("tests")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment_by_name("tests").tags

    result = fit(recipe_from_dict(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    experiment = client.get_experiment_by_name("tests")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    assert result.experiment_id == experiment.experiment_id

    train = client.get_run(result.run_id)
    assert train.data.tags["kind"] == "train" and "mlflow.parentRunId" not in train.data.tags
    inputs = _inputs(train)
    assert set(inputs) == {"train", "val", "test"}
    info = get_dataset("synthfer", tiny_synthfer)
    for context, dataset in inputs.items():
        rows = info.split(context)
        full = dataset_hash(rows["image_id"].tolist(), rows["label"])
        assert dataset.name == "synthfer" and dataset.digest == full[:16], context
        profile = json.loads(dataset.profile)
        assert profile == {"num_rows": len(rows), "split": context, "dataset_hash": full}
        columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
        # the manifest's columns as training read them (here from the prepared cache), never image data
        assert {"image_id", "path", "split", "label", "skin_tone"} <= set(columns) and len(columns) < 30
        assert (columns["image_id"], columns["label"], columns["skin_tone"]) == ("string", "long", "string")
    # the test input's digest is the evaluator's hash of the rows it scored (results.json, report.md)
    assert inputs["test"].digest == result.test_results["dataset_hash"][:16]

    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.info.run_name == "eval-synthfer"
    assert child.data.tags["kind"] == "eval" and child.data.tags["train_run_id"] == result.run_id
    for key in ("dataset", "protocol", "protocol_version", "backbone"):
        assert child.data.tags[key] == train.data.tags[key], key
    assert child.data.metrics["test/acc"] == train.data.metrics["test/acc"] == result.test_results["metrics"]["acc"]
    assert set(_inputs(child)) == {"test"} and _inputs(child)["test"].digest == inputs["test"].digest
    assert "eval/report.md" in {a.path for a in client.list_artifacts(child.info.run_id, "eval")}

    # `ferbench eval` on its own: a top-level run in the training's experiment, with its test split as input
    args = ["eval", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--bootstrap", "0"]
    evaluated = runner.invoke(app, [*args, "--checkpoint", str(result.output_dir / "best.pt")])
    assert evaluated.exit_code == 0, evaluated.output
    known = {train.info.run_id, child.info.run_id}
    alone = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id not in known]
    assert len(alone) == 1 and "mlflow.parentRunId" not in alone[0].data.tags
    assert alone[0].data.tags["train_run_id"] == result.run_id
    assert _inputs(alone[0])["test"].digest == inputs["test"].digest
    # compare lists the training run once (its child run holds the same figures) and the separate eval run
    table = runner.invoke(app, ["compare", "--tracking-uri", uri, "--plot", str(tmp_path / "c.png")])
    assert table.exit_code == 0, table.output
    assert runs_page_url(experiment.experiment_id) in table.output.replace("\n", "")


def test_an_experiment_kind_chosen_before_is_kept_and_a_failed_store_stays_quiet(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    chosen = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    warnings: list[str] = []
    tracker = Tracker(enabled=True, tracking_uri=uri, experiment="mine", run_name="r", warn=warnings.append)
    assert tracker.active
    tracker.end()
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    fresh = Tracker(enabled=True, tracking_uri=uri, experiment="new", run_name="r", warn=warnings.append)
    fresh.end()
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert not warnings

    # an input MLflow refuses (a name over its 500 characters) costs one line; the run's other records go on
    rows = pd.DataFrame({"image_id": ["a", "b"], "path": ["a.png", "b.png"], "split": "test", "label": [0, 1]})
    tracker = Tracker(enabled=True, tracking_uri=uri, experiment="new", run_name="r", warn=warnings.append)
    tracker.log_inputs([split_input(name="x" * 600, context="test", rows=rows, source=tmp_path)])
    tracker.log_metrics({"a": 1.0})
    tracker.end()
    assert len(warnings) == 1 and "dataset inputs not recorded" in warnings[0]
    assert client.get_run(tracker.run_id).data.metrics == {"a": 1.0}

    # tracking off: inputs and child runs are no-ops, never errors
    off = Tracker(enabled=False, tracking_uri=uri, experiment="x")
    off.log_inputs([split_input(name="x", context="test", rows=rows, source=tmp_path)])
    with off.child(run_name="c", tags={}) as child:
        assert not child.active
        child.log_metrics({"a": 1.0})


def test_the_runs_page_address_selects_the_machine_learning_view():
    assert runs_page_url("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_page_url(None, host="http://h:1/").endswith("h:1/#/experiments?workflowType=machine_learning")
