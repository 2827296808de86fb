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
