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
    spec, recipes = load_study(_write(tmp_path, GOOD))
    assert spec.pairs == [("small_lr", "base")] and sorted(recipes) == [
        (arm, seed) for arm in ("base", "small_lr") for seed in (0, 1, 2)
    ]
    assert recipes[("small_lr", 1)].optim.lr == 0.0001 and recipes[("small_lr", 1)].runtime.seed == 1
    assert recipes[("base", 0)].tracking.run_name == "heads-base-seed0"
    rows = describe_runs(recipes)
    assert len({row["run_key"] for row in rows}) == 6  # every arm x seed is its own run


def test_run_key_changes_with_any_setting_and_not_with_names(tmp_path):
    _, recipes = load_study(_write(tmp_path, GOOD))
    _, renamed = load_study(_write(tmp_path, GOOD.replace("name: heads", "name: other")))
    assert run_key(recipes[("base", 0)]) == run_key(renamed[("base", 0)])  # found again: not rerun
    _, changed = load_study(_write(tmp_path, GOOD.replace("base: []", 'base: ["optim.weight_decay=0.01"]')))
    assert run_key(recipes[("base", 0)]) != run_key(changed[("base", 0)])
    assert run_key(recipes[("small_lr", 2)]) == run_key(changed[("small_lr", 2)])  # the other arm is untouched


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
