"""What a study needs from one training run: nesting under a study run with its tags, extra evaluations of the best
checkpoint, per-image predictions beside every report, a done.json marker of completion, and a fer_bench checkpoint
as the starting backbone. Real MLflow (a sqlite store), real timm, tiny SynthFER."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.errors import CheckpointError, ConfigError
from fer_bench.models import create_model
from fer_bench.models.checkpoint import load_checkpoint
from fer_bench.train import fit, load_recipe, recipe_from_dict
from fer_bench.train.fit import read_done
from tests.conftest import Recorder, tiny_recipe_dict

#: A narrow 2-block ViT: the occlusion head's mask token needs a block after it.
TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
OCCLUDED_COPY = {"seed": 5, "size": 32, "n_train": 8, "n_val": 8, "n_test": 24, "occlusion_fraction": 1.0}


def _tiny(root: Path, out: Path, **overrides) -> dict:
    recipe = tiny_recipe_dict(root, out, **overrides)
    recipe["model"]["backbone_kwargs"] = dict(TINY_VIT)
    recipe["optim"]["epochs"] = 1
    recipe["runtime"]["max_steps"] = recipe["runtime"].get("max_steps", 3)
    return recipe


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def study_run(tiny_synthfer, tmp_path_factory):
    """One run as a study starts it: nested under a parent run made by another client, tagged, with an occlusion
    head and two extra evaluations (a fully occluded SynthFER copy generated on the fly, and the test split blurred)."""
    tmp = tmp_path_factory.mktemp("study_run")
    recipe_dict = _tiny(tiny_synthfer, tmp)
    uri = recipe_dict["tracking"]["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tests")
    parent = client.create_run(experiment, run_name="study-parent").info.run_id  # never active in this process
    recipe_dict["model"]["heads"] = {"occlusion": {"decoder_dim": 8, "decoder_depth": 0}}
    recipe_dict["tracking"] |= {"parent_run_id": parent, "tags": {"study": "s1", "arm": "a", "seed": 0}}
    recipe_dict["extra_evals"] = [
        {"name": "occ", "root": str(tmp / "synth_occ"), "synth": OCCLUDED_COPY},
        {"name": "blur", "perturb": "blur"},
    ]
    recipe = recipe_from_dict(recipe_dict)
    recorder = Recorder()
    result = fit(recipe, callbacks=recorder)
    return {"recipe": recipe, "result": result, "parent": parent, "client": client, "messages": recorder.messages}


def _children(client, run) -> list:
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def test_the_training_run_is_a_tagged_child_of_the_given_parent(study_run):
    client, result = study_run["client"], study_run["result"]
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == study_run["parent"]
    assert {k: run.data.tags[k] for k in ("study", "arm", "seed")} == {"study": "s1", "arm": "a", "seed": "0"}
    assert run.data.tags["kind"] == "train" and run.info.status == "FINISHED"
    # the study's tags follow onto the evaluation runs, which stay children of the training run
    evals = _children(client, run)
    assert sorted(r.data.tags["eval_name"] for r in evals) == ["blur", "eval", "occ"]
    assert all(r.data.tags["study"] == "s1" and r.data.tags["kind"] == "eval" for r in evals)


def test_tags_override_from_the_command_line_and_bad_parents_are_refused(tiny_synthfer, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny(tiny_synthfer, tmp_path)))
    recipe = load_recipe(path, ["tracking.tags={study: s, arm: a, seed: 0}", "tracking.parent_run_id=abc123"])
    assert recipe.tracking.tags == {"study": "s", "arm": "a", "seed": "0"}
    with pytest.raises(ConfigError, match=r"tracking\.tags: .*mlflow\.\* tags are MLflow's own"):
        load_recipe(path, ["tracking.tags={mlflow.runName: x}"])
    with pytest.raises(ConfigError, match=r"tracking\.parent_run_id: .*expected an MLflow run id"):
        load_recipe(path, ["tracking.parent_run_id='a b'"])


def test_an_extra_eval_on_an_occluded_synthfer_copy_scores_the_occlusion_head(study_run):
    out = study_run["result"].output_dir
    assert (out / "eval-occ" / "report.md").is_file() and (out / "eval-occ" / "predictions.csv").is_file()
    results = json.loads((out / "eval-occ" / "results.json").read_text())
    assert results["n"] == 24 and results["eval_name"] == "occ"
    assert results["checkpoint_step"] == load_checkpoint(out / "best.pt")["global_step"]
    detection = results["heads"]["occlusion_detection"]
    assert isinstance(detection["f1"], float) and detection["occluded_patches"] > 0
    assert yaml.safe_load((Path(study_run["recipe"].extra_evals[0].root) / "synthfer.yaml").read_text())
    blurred = json.loads((out / "eval-blur" / "results.json").read_text())
    assert blurred["config"]["perturb"] == "blur" and blurred["robustness"]["perturbation"] == "blur"

    client, result = study_run["client"], study_run["result"]
    run = client.get_run(result.run_id)
    assert "eval-occ/acc" in run.data.metrics and "eval-blur/acc" in run.data.metrics
    (child,) = [r for r in _children(client, run) if r.data.tags.get("eval_name") == "occ"]
    assert child.info.run_name == "eval-occ" and child.data.tags["protocol"] == "synthfer"
    assert child.data.tags["train_run_id"] == result.run_id
    assert child.data.metrics["test/acc"] == pytest.approx(results["metrics"]["acc"])
    assert "test/heads/occlusion_detection/f1" in child.data.metrics
    logged = [*child.data.metrics, *run.data.metrics, *run.data.params, *child.data.tags]
    assert not [k for k in logged if "per_image" in k or "image_id" in k or "y_pred" in k]  # arrays stay in the CSV
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "eval-occ")}
    assert {"eval-occ/results.json", "eval-occ/predictions.csv"} <= artifacts


@pytest.mark.parametrize("folder", ["eval", "eval-occ"])
def test_predictions_csv_holds_every_scored_image_and_results_json_none(study_run, folder, tiny_synthfer):
    out = study_run["result"].output_dir / folder
    results = json.loads((out / "results.json").read_text())
    assert "per_image" not in results
    rows = _rows(out / "predictions.csv")
    columns = list(rows[0])
    assert columns[:3] == ["image_id", "y_true", "y_pred"] and columns[-1] == "att_cos"
    assert {"skin_tone", "hair", "age", "glasses"} <= set(columns)
    assert len(rows) == results["n"]
    correct = sum(int(r["y_true"]) == int(r["y_pred"]) for r in rows)
    assert correct / len(rows) == pytest.approx(results["metrics"]["acc"])
    assert all(0 <= int(r["y_pred"]) < len(results["label_space"]["names"]) for r in rows)
    assert any(r["att_cos"] != "nan" for r in rows)  # SynthFER's AU maps: ATT-COS per image
    if folder == "eval":  # the protocol's rows, in manifest order
        from fer_bench.data import get_dataset

        manifest = get_dataset("synthfer", tiny_synthfer).split("test")
        assert [r["image_id"] for r in rows] == manifest["image_id"].astype(str).tolist()


def test_done_json_names_the_evaluations_and_a_resume_of_a_finished_run_redoes_none(study_run):
    result, client = study_run["result"], study_run["client"]
    done = read_done(result.output_dir)
    assert done["run_id"] == result.run_id and done["evals"] == ["eval", "eval-occ", "eval-blur"]
    assert done["best_step"] == load_checkpoint(result.output_dir / "best.pt")["global_step"]
    before = len(_children(client, client.get_run(result.run_id)))
    recorder = Recorder()
    again = fit(study_run["recipe"], resume=True, callbacks=recorder)
    evaluated = [m for m in recorder.messages if "was evaluated already" in m]
    assert len(evaluated) == 3, recorder.messages
    assert len(_children(client, client.get_run(result.run_id))) == before
    assert again.test_results["metrics"] == result.test_results["metrics"]
    assert read_done(result.output_dir)["evals"] == done["evals"]


def test_done_json_is_gone_while_a_run_is_in_progress_and_after_it_dies(tiny_synthfer, tmp_path):
    recipe_dict = _tiny(tiny_synthfer, tmp_path, **{"runtime.max_steps": 2})
    recipe_dict["tracking"]["enabled"] = False
    fit(recipe_from_dict(recipe_dict))
    out = Path(recipe_dict["output_dir"])
    assert read_done(out) == {**read_done(out), "run_id": None, "evals": ["eval"]}

    class DiesAfterAnEpoch(Recorder):
        seen: list[bool] = []

        def start_epoch(self, *args) -> None:
            self.seen.append((out / "done.json").exists())

        def end_epoch(self, row) -> None:  # last.pt is written: the process dies here, as a kill would leave it
            raise KeyboardInterrupt

    longer = recipe_from_dict({**recipe_dict, "runtime": {**recipe_dict["runtime"], "max_steps": 4}})
    with pytest.raises(KeyboardInterrupt):
        fit(longer, resume=True, callbacks=DiesAfterAnEpoch())
    assert DiesAfterAnEpoch.seen == [False]
    assert (out / "last.pt").is_file() and not (out / "done.json").exists() and read_done(out) is None
    fit(longer, resume=True)
    assert read_done(out)["best_step"] == load_checkpoint(out / "best.pt")["global_step"]


def test_a_fer_bench_checkpoint_is_a_pretrained_backbone(study_run):
    best = study_run["result"].output_dir / "best.pt"
    state = load_checkpoint(best)
    model = create_model(
        "vit_tiny_patch16_224", num_classes=7, img_size=32, pretrained=str(best), heads={"au_heatmap": {}}, **TINY_VIT
    )
    for name in ("blocks.0.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight", "norm.bias"):
        assert torch.equal(model.backbone.state_dict()[name], state["model"][f"backbone.{name}"]), name
    assert model.backbone.head.weight.shape[0] == 7  # the classifier starts fresh, for the new classes


def test_a_checkpoint_of_another_backbone_is_one_line_naming_the_file_and_key(study_run, tiny_synthfer, tmp_path):
    best = study_run["result"].output_dir / "best.pt"
    wider = r"best\.pt: a checkpoint of vit_tiny_patch16_224 at img_size 32, .*key: 'cls_token' has shape \[1, 1, 32\]"
    with pytest.raises(CheckpointError, match=wider):
        create_model(
            "vit_tiny_patch16_224", num_classes=8, img_size=32, pretrained=best, **{**TINY_VIT, "embed_dim": 64}
        )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_tiny(tiny_synthfer, tmp_path)))
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--set", f"model.pretrained={best}", "--set", "model.backbone_kwargs.depth=3"]
    )
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.count("error:") == 1, text
    error = text[text.index("error:") :]
    assert len(error.splitlines()) == 1, error  # one line, after any progress output
    assert f"model.pretrained={best}" in error and "first mismatching key: 'blocks.2." in error


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("extra_evals=[{name: b, perturb: blurr}]", r"extra_evals\.0\.perturb: .*Did you mean 'blur'"),
        ("extra_evals=[{name: b, datset: rafdb}]", r"extra_evals\.0\.datset: unknown key\. Did you mean 'dataset'"),
        ("extra_evals=[{name: b, dataset: rafbd}]", r"extra_evals\.0\.dataset: .*Did you mean 'rafdb'"),
        ("extra_evals=[{name: eval}]", r"extra_evals\.0\.name: .*the test evaluation's own folder"),
        ("extra_evals=[{name: a/b}]", r"extra_evals\.0\.name: .*letters, digits"),
        ("extra_evals=[{name: a}, {name: a}]", r"extra_evals: .*'a' repeated"),
        ("extra_evals=[{name: a, root: x, synth: {sise: 32}}]", r"extra_evals\.0 \(a\): synth\.sise: .*'size'"),
        ("extra_evals=[{name: a, synth: {size: 32}}]", r"extra_evals\.0: .*its own root"),
        ("extra_evals=[{name: a, dataset: rafdb, root: x, synth: {}}]", r"synth: SynthFER parameters, but .*'rafdb'"),
        ("extra_evals=[{name: a, dataset: affectnet7, options: {classes: 8}}]", r"'affectnet7' fixes 7"),
    ],
)
def test_bad_extra_evals_are_recipe_errors(tiny_synthfer, tmp_path, override, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny(tiny_synthfer, tmp_path)))
    with pytest.raises(ConfigError, match=expected):
        load_recipe(path, [override])


def test_submissions_carry_per_image_predictions_too(tiny_synthfer, tmp_path):
    """score_submission's results carry the per-image record; write_report puts it in predictions.csv only."""
    from fer_bench.data import get_dataset
    from fer_bench.eval import get_protocol, write_report
    from fer_bench.eval.submission import score_submission, write_submission

    info = get_dataset("synthfer", tiny_synthfer)
    protocol = get_protocol("synthfer")
    rows = info.split("test")
    names = tuple(info.label_space.names)
    probs = torch.softmax(torch.randn(len(rows), len(names), generator=torch.Generator().manual_seed(0)), 1).numpy()
    path = tmp_path / "sub.csv"
    write_submission(path, ids=rows["image_id"].astype(str).tolist(), label_names=names, probs=probs)
    results = score_submission(path, info, protocol, n_bootstrap=0)
    assert len(results["per_image"]["y_pred"]) == len(rows)
    paths = write_report(results, tmp_path / "ev")
    assert "per_image" not in json.loads(paths["results"].read_text())
    table = _rows(paths["predictions"])
    assert [int(r["y_pred"]) for r in table] == probs.argmax(1).tolist()
    assert "att_cos" not in table[0]  # no model, no head values


def test_a_parent_run_that_does_not_exist_is_reported_and_the_run_starts_at_the_top(tmp_path):
    from fer_bench.train.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warnings: list[str] = []
    tracker = Tracker(
        enabled=True,
        tracking_uri=uri,
        experiment="tests",
        run_name="orphan",
        parent_run_id="0123456789abcdef0123456789abcdef",
        tags={"study": "s"},
        warn=warnings.append,
    )
    tracker.end()
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["study"] == "s"
    assert len(warnings) == 1 and "no such run" in warnings[0], warnings
