"""Study files: validation with one clear line per mistake, and run identity by the resolved recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_bench.errors import ConfigError
from fer_bench.train.study import describe_runs, load_study, run_key

GOOD = """\
name: heads
base: quickstart
seeds: [0, 1, 2]
metric: acc
arms:
  base: []
  small_lr: ["optim.lr=0.0001"]
pairs:
  - [small_lr, base]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_study_resolves_every_arm_and_seed_into_a_recipe(tmp_path):
    study = load_study(_write(tmp_path, GOOD))
    assert [(p.a, p.b, p.on) for p in study.spec.pairs] == [("small_lr", "base", "test")]
    assert [(run.arm, run.seed) for run in study.runs] == [
        (arm, seed) for arm in ("base", "small_lr") for seed in (0, 1, 2)
    ]
    recipe = study.run("small_lr", 1).recipe
    assert recipe.optim.lr == 0.0001 and recipe.runtime.seed == 1
    assert study.run("base", 0).recipe.tracking.run_name == "heads-base-seed0"
    rows = describe_runs(study)
    assert len({row["run_key"] for row in rows}) == 6  # every arm x seed is its own run
    assert len({row["output_dir"] for row in rows}) == 6 and all(
        row["output_dir"].startswith(str(Path("runs/studies/heads"))) for row in rows
    )


def test_run_key_changes_with_any_setting_and_not_with_names(tmp_path):
    study = load_study(_write(tmp_path, GOOD))
    renamed = load_study(_write(tmp_path, GOOD.replace("name: heads", "name: other")))
    assert study.run("base", 0).key == renamed.run("base", 0).key  # found again: not rerun
    changed = load_study(_write(tmp_path, GOOD.replace("base: []", 'base: ["optim.weight_decay=0.01"]')))
    assert study.run("base", 0).key != changed.run("base", 0).key
    assert study.run("base", 0).out != changed.run("base", 0).out  # a new run goes to a new folder
    assert study.run("small_lr", 2).key == changed.run("small_lr", 2).key  # the other arm is untouched
    # where it writes, how it is tracked and how fast it runs are not what it learns
    moved = load_study(_write(tmp_path, GOOD + "output_dir: elsewhere/{name}\n"))
    assert moved.run("base", 0).key == study.run("base", 0).key and str(moved.run("base", 0).out).startswith("else")
    assert (
        run_key(
            study.run("base", 0).recipe.model_copy(
                update={"runtime": study.run("base", 0).recipe.runtime.model_copy(update={"threads": 1})}
            )
        )
        == study.run("base", 0).key
    )


def test_the_printed_command_resolves_to_the_same_run(tmp_path):
    """`study commands` and `study run` start a run with train_command: its --set list rebuilds the same recipe."""
    import shlex

    from fer_bench.train.recipe import load_recipe
    from fer_bench.train.study import shell_line, train_command

    study = load_study(_write(tmp_path, GOOD + "perturbations: [blur]\n"))
    run = study.run("small_lr", 2)
    args = train_command(study, run, parent_run_id="abc123", resume=True)
    line = shell_line(args, cwd=tmp_path)
    parsed = shlex.split(line.split(" && ", 1)[1])
    assert parsed[:3] == ["ferbench", "train", str(run.base)] and parsed[-1] == "--resume"
    settings = [parsed[i + 1] for i, a in enumerate(parsed) if a == "--set"]
    recipe = load_recipe(run.base, settings)
    assert run_key(recipe) == run.key and recipe.output_dir == str(run.out)
    assert recipe.tracking.parent_run_id == "abc123"
    assert recipe.tracking.tags == {"study": "heads", "arm": "small_lr", "seed": "2", "run_key": run.key}
    assert [(e.name, e.perturb) for e in recipe.extra_evals] == [("blur", "blur")]


def test_a_pretraining_run_starts_every_arm_and_is_part_of_their_identity(tmp_path):
    text = GOOD + "pretrain:\n  set: [optim.epochs=3]\n"
    study = load_study(_write(tmp_path, text))
    pre = study.pretrain
    assert study.runs[0] is pre and pre.recipe.optim.epochs == 3
    assert all(run.recipe.model.pretrained == str(pre.out / "best.pt") for run in study.arm_runs)
    longer = load_study(_write(tmp_path, text.replace("epochs=3", "epochs=4")))
    assert longer.pretrain.key != pre.key and longer.run("base", 0).key != study.run("base", 0).key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("seeds:", "seeeds:"), "seeeds: unknown key. Did you mean 'seeds'?"),
        (GOOD.replace("metric: acc", "metric: accuracy"), "unknown metric 'accuracy'"),
        (GOOD.replace("[small_lr, base]", "[small_l, base]"), "pairs: no arm 'small_l'. Did you mean 'small_lr'?"),
        (GOOD.replace("[small_lr, base]", "[base, base]"), "compares an arm with itself"),
        (GOOD.replace("seeds: [0, 1, 2]", "seeds: [0, 0]"), "seeds must be distinct"),
        (GOOD.replace("optim.lr=0.0001", "optim.lrr=0.0001"), "arm 'small_lr': "),
        (GOOD.replace("base: quickstart", "base: quickstrat"), "base: recipe 'quickstrat'"),
        (GOOD.replace('arms:\n  base: []\n  small_lr: ["optim.lr=0.0001"]\n', "arms: {}\n"), "arms"),
        ("- just\n- a list\n", "must be a mapping"),
        ("# nothing\n", "the study is empty"),
        ("name: [unclosed\n", "invalid YAML"),
        (GOOD + "perturbations: [blurr]\n", "unknown perturbation 'blurr'"),
        (GOOD.replace("[small_lr, base]", "{a: small_lr, b: base, on: occluded}"), "no such evaluation set"),
        (GOOD.replace("[small_lr, base]", "{a: small_lr, b: base, metric: f1}"), "unknown metric 'f1'"),
        (GOOD.replace("  base: []", "  pretrain: []"), "not 'pretrain'"),
        (GOOD + "datasets: [synthfer, synthfer]\n", "two evaluation sets named 'synthfer'"),
        (GOOD + "alpha: 1.5\n", "alpha"),
        # unknown keys at every level, wrong types
        (GOOD.replace("[small_lr, base]", "{a: small_lr, b: base, foo: 1}"), "pairs.0.foo: unknown key"),
        (GOOD + "datasets: [{dataset: synthfer, rot: x}]\n", "datasets.0.rot: unknown key. Did you mean 'root'?"),
        (GOOD + "pretrain: {sett: []}\n", "pretrain.sett: unknown key"),
        (GOOD.replace("seeds: [0, 1, 2]", "seeds: abc"), "seeds: Input should be a valid list"),
        (GOOD.replace("seeds: [0, 1, 2]", "seeds: [true]"), "seeds.0: Input should be a valid integer"),
        (GOOD.replace('arms:\n  base: []\n  small_lr: ["optim.lr=0.0001"]\n', "arms: [a, b]\n"), "arms: Input"),
        (GOOD.replace('["optim.lr=0.0001"]', "optim.lr=0.0001"), "arms.small_lr: Input should be a valid list"),
        (GOOD.replace("optim.lr=0.0001", "optim.lr"), "--set 'optim.lr': expected key.path=value"),
        # a study name is a folder and an MLflow tag value
        (GOOD.replace("name: heads", "name: a/b"), "a study name is letters, digits"),
        (GOOD.replace("name: heads", "name: 'my study'"), "a study name is letters, digits"),
        (GOOD.replace("name: heads", "name: '..'"), "a study name is letters, digits"),
        # what the study sets for every run cannot be set by an arm (it would be silently replaced)
        (GOOD.replace("optim.lr=0.0001", "runtime.seed=7"), "arms.small_lr: --set 'runtime.seed': set by the study's"),
        (GOOD.replace("optim.lr=0.0001", "output_dir=elsewhere"), "--set 'output_dir': set by the study's output_dir"),
        (GOOD.replace("optim.lr=0.0001", "tracking.tracking_uri=sqlite:///x.db"), "--set 'tracking.tracking_uri'"),
        (GOOD + "pretrain: {set: [runtime.seed=3]}\n", "pretrain.set: --set 'runtime.seed'"),
        # YAML keeps the last of two equal keys: an arm would vanish silently
        (GOOD.replace("  small_lr:", "  base: [optim.lr=0.1]\n  small_lr:"), "study.yaml:7: 'base' given twice"),
        # two arms that are one recipe would train the same run twice and compare it with itself
        (
            GOOD.replace('["optim.lr=0.0001"]', '["runtime.threads=1"]'),
            "arms 'base' and 'small_lr' resolve to the same",
        ),
        (GOOD.replace("name: heads\n", ""), "missing key(s) name"),
    ],
)
def test_study_errors_name_the_key_and_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_study(_write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_binary_study_files(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        load_study(tmp_path / "none.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_study(binary)


def test_a_folder_an_empty_file_and_a_recipe_are_no_study(tmp_path):
    folder = tmp_path / "study.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder; give a study file"):
        load_study(folder)
    comments = tmp_path / "comments.yaml"
    comments.write_text("# a study, some day\n")
    with pytest.raises(ConfigError, match="the study is empty; see studies/"):
        load_study(comments)
    with pytest.raises(ConfigError, match="a recipe, not a study") as info:
        load_study(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert "\n" not in str(info.value) and "{" not in str(info.value)  # not the whole recipe dumped


def test_a_bad_base_recipe_is_named_as_the_base(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: broken\noptim: {lr: abc}\n")
    with pytest.raises(ConfigError) as info:
        load_study(_write(tmp_path, GOOD.replace("base: quickstart", "base: broken.yaml")))
    said = str(info.value)
    assert "study.yaml: base: " in said and "broken.yaml: optim.lr:" in said and "arm " not in said
    with pytest.raises(ConfigError, match="base: names the study file itself"):
        load_study(_write(tmp_path, GOOD.replace("base: quickstart", "base: study.yaml")))


def _tiny_base(tmp_path: Path) -> Path:
    """A base recipe that never touches an MLflow store (tracking off) and points at a data folder not needed here."""
    import yaml

    from tests.conftest import tiny_recipe_dict

    recipe = tiny_recipe_dict(tmp_path / "synth", tmp_path)
    recipe["tracking"]["enabled"] = False
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "base.yaml"


def _finished_run(run, *, y_true, y_pred, att: bool = True) -> Path:
    """A run folder as ``ferbench train`` leaves it (done.json, eval/results.json, eval/predictions.csv)."""
    import json

    import numpy as np
    import pandas as pd

    folder = run.out / "eval"
    folder.mkdir(parents=True)
    acc = float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
    results = {
        "metrics": {"acc": acc, "mean_class_acc": acc, "macro_f1": acc},
        "label_space": {"names": [str(i) for i in range(3)]},
        "fairness": {},
        "n": len(y_true),
    }
    table = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(y_true))], "y_true": y_true, "y_pred": y_pred})
    if att:
        results["heads"] = {"au_attention": {"att_cos": 0.5}}
        table["att_cos"] = 0.5
    (folder / "results.json").write_text(json.dumps(results))
    table.to_csv(folder / "predictions.csv", index=False)
    (run.out / "done.json").write_text(json.dumps({"run_id": None, "evals": ["eval"]}))
    return folder


TWO_ARMS = """\
name: probe
base: base.yaml
seeds: [0]
arms:
  a: []
  b: ["optim.lr=0.003"]
pairs: [[b, a]]
"""


def _report(tmp_path: Path, *args: str):
    from typer.testing import CliRunner

    from fer_bench.cli import app

    return CliRunner().invoke(app, ["study", "report", str(tmp_path / "study.yaml"), "--bootstrap", "100", *args])


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda f: (f / "predictions.csv").unlink(), "predictions.csv: missing"),
        (
            lambda f: (f / "predictions.csv").write_text((f / "predictions.csv").read_text()[:40]),
            "rows for the 30 images results.json scored (truncated?)",
        ),
        (lambda f: (f / "predictions.csv").write_bytes(b"\xff\xfe\x00junk"), "predictions.csv: unreadable"),
        (lambda f: (f / "predictions.csv").write_text("image_id,label\nx,1\n"), "no column(s) y_true, y_pred"),
        (lambda f: (f / "results.json").write_text('{"metrics": '), "results.json: unreadable (JSONDecodeError"),
        (lambda f: (f / "results.json").write_text("[]"), "results.json: no metrics"),
    ],
)
def test_a_run_with_a_damaged_file_is_left_out_of_the_report_with_its_file_named(tmp_path, damage, said):
    _tiny_base(tmp_path)
    path = _write(tmp_path, TWO_ARMS + f"output_dir: {tmp_path / 'runs'}\n")
    study = load_study(path)
    y = [i % 3 for i in range(30)]
    damage(_finished_run(study.run("a", 0), y_true=y, y_pred=y))
    _finished_run(study.run("b", 0), y_true=y, y_pred=[(v + 1) % 3 for v in y])
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and f"a/seed0: left out of the report: {study.run('a', 0).out}" in (
        result.output.replace("\n", "")
    )
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "runs found: 1 of 2" in text and f"- left out, a/seed0: {study.run('a', 0).out / 'eval'}" in text
    assert said in text and "| b | a | test | acc | — | — | — | — | no usable run of a (left out, see above) |" in text
    # with every run unusable there is nothing to report: one line, exit 2
    damage(study.run("b", 0).out / "eval")
    result = _report(tmp_path)
    assert result.exit_code == 2 and "2 finished run(s) left out" in result.output and "Traceback" not in result.output


def test_report_pairs_without_a_test_say_why(tmp_path):
    """One arm not run yet; then att_cos compared on runs without AU maps; then a report folder that is a file."""
    _tiny_base(tmp_path)
    path = _write(tmp_path, TWO_ARMS + f"output_dir: {tmp_path / 'runs'}\n")
    study = load_study(path)
    y = [i % 3 for i in range(30)]
    _finished_run(study.run("a", 0), y_true=y, y_pred=y, att=False)
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert "| b | a | test | acc | — | — | — | — | not run yet |" in (tmp_path / "runs" / "report.md").read_text()
    _finished_run(study.run("b", 0), y_true=y, y_pred=y[::-1], att=False)
    path.write_text(path.read_text() + "metric: att_cos\n")
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "| b | a | test | att_cos | — | — | — | — | not available: no per-image att_cos in these runs" in text
    assert "| a | 0 | — |" in text and "nan" not in text  # the runs table: no value, not 'nan'
    (tmp_path / "afile").write_text("")
    result = _report(tmp_path, "--report-dir", str(tmp_path / "afile" / "r"))
    assert result.exit_code == 2 and "the report cannot be written there" in result.output
    assert "Traceback" not in result.output


def test_gpus_that_this_machine_lacks_are_one_line_before_anything_runs(tmp_path):
    import torch
    from typer.testing import CliRunner

    from fer_bench.cli import app

    _tiny_base(tmp_path)
    path = _write(tmp_path, TWO_ARMS + f"output_dir: {tmp_path / 'runs'}\n")
    want = torch.cuda.device_count() + 1
    result = CliRunner().invoke(app, ["study", "run", str(path), "--gpus", str(want), "--parallel", "1"])
    assert result.exit_code == 2 and f"--gpus {want}: this machine has {want - 1} CUDA device(s)" in result.output
    assert not (tmp_path / "runs").exists()  # nothing generated or started


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("studies/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_study_file_resolves(path):
    """The studies in studies/ (and their base recipes) stay valid as the recipe schema moves on."""
    if "arms:" not in path.read_text():  # a base recipe of the studies
        from fer_bench.train.recipe import load_recipe

        assert load_recipe(path).data.dataset == "synthfer"
        return
    study = load_study(path)
    assert study.arm_runs and len({run.key for run in study.runs}) == len(study.runs)


def test_a_detector_scored_on_faces_without_occluders_has_no_f1_and_the_report_goes_on():
    """The occlusion head on the clean test split: precision/recall/F1 are None (no occluded patch); found in a real
    heads study, where the report stopped with a TypeError."""
    import math

    import pandas as pd

    from fer_bench.train.study_report import Scored

    results = {
        "metrics": {"acc": 0.8},
        "heads": {"occlusion_detection": {"f1": None, "precision": None}, "au_attention": {"att_cos": None}},
    }
    scored = Scored(results, pd.DataFrame())
    assert math.isnan(scored.metric("detect_f1")) and math.isnan(scored.metric("att_cos"))
    assert scored.metric("acc") == 0.8 and math.isnan(scored.metric("macro_f1"))
    clean = Scored(
        {"metrics": {}, "heads": {"occlusion_detection": {"f1": 0.0, "occluded_patches": 0}}}, pd.DataFrame()
    )
    occluded = Scored(
        {"metrics": {}, "heads": {"occlusion_detection": {"f1": 0.5, "occluded_patches": 9}}}, pd.DataFrame()
    )
    assert math.isnan(clean.metric("detect_f1")) and occluded.metric("detect_f1") == 0.5
