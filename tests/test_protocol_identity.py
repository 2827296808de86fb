"""One meaning of "protocol" (issue 12): training and eval attach the same versioned protocol, resolved from the
dataset and its options; the report never prints an empty field; MLflow tags mean the same in both runs."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.data import dataset_options, list_datasets
from fer_bench.eval.protocols import (
    get_protocol,
    list_protocols,
    load_protocol_data,
    protocol_for,
    protocol_rows,
)
from tests import formats
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


@pytest.mark.parametrize("name", list_protocols())
def test_every_protocol_reads_its_dataset_and_scores_rows(tmp_path, name):
    """Each registered protocol names a registered dataset and options its adapter takes, reads a fixture tree in
    that dataset's format, scores some rows of it, and (when it scores all rows) is what training on that dataset
    with those options is scored under."""
    protocol = get_protocol(name)
    assert protocol.name == name and protocol.version >= 1 and protocol.description
    assert protocol.dataset in list_datasets()
    assert set(protocol.options) <= set(dataset_options(protocol.dataset)), protocol.options
    root, options = formats.dataset_tree(protocol.dataset, tmp_path / "data")
    info = load_protocol_data(protocol, root, {k: v for k, v in options.items() if k not in protocol.options})
    rows = protocol_rows(protocol, info)
    assert len(rows) > 0 and set(rows["split"]) == {protocol.split}
    if protocol.subset is None:
        assert protocol_for(protocol.dataset, protocol.options, split=protocol.split).name == name
    else:
        assert len(rows) < len(info.split(protocol.split))  # the subset is a strict part of the split


def test_protocols_resolve_from_the_dataset_and_its_options():
    assert protocol_for("affectnet", {"classes": 7}).name == "affectnet7"
    assert protocol_for("affectnet", {}).name == "affectnet8"  # the adapter's default classes=8
    assert protocol_for("infer", {"protocol": "cv10"}).name == "infer-cv10"
    assert protocol_for("rafdb", {}).name == "rafdb" and protocol_for("rafdb", {}).subset is None
    adhoc = protocol_for("folder", {}, split="val")
    assert (adhoc.name, adhoc.version, adhoc.split) == ("folder", 0, "val") and "ad hoc" in adhoc.description


def test_train_and_eval_runs_carry_the_same_protocol(tiny_synthfer, tmp_path):
    import mlflow

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    report = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "- protocol: synthfer v1 — SynthFER test split" in report
    assert " - v-" not in report and "v- " not in report and "(-)" not in report and not report.count("; \n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["eval", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--bootstrap", "0"]
    result = runner.invoke(app, [*args, "--checkpoint", str(tmp_path / "run" / "best.pt"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tags = [r.data.tags for r in runs]
    # the training run, its evaluation (a child run) and the separate eval run (a run of its own)
    assert len(runs) == 3 and sorted(t["kind"] for t in tags) == ["eval", "eval", "train"]
    assert {(t["dataset"], t["protocol"], t["protocol_version"]) for t in tags} == {("synthfer", "synthfer", "1")}
    (train,) = [r for r in runs if r.data.tags["kind"] == "train"]
    parents = sorted(r.data.tags.get("mlflow.parentRunId", "") for r in runs if r.data.tags["kind"] == "eval")
    assert parents == ["", train.info.run_id]
    shown = runner.invoke(app, ["compare", "--dataset", "synthfer", "--tracking-uri", uri], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    # the training run (once: its child run holds the same figures) and the eval run both listed
    assert shown.output.count("synthfer") >= 2 and shown.output.count("tiny (tests)") == 1
