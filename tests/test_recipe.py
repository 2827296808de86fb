"""Recipes: validation errors name the dotted key; overrides; every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_bench.errors import ConfigError
from fer_bench.train import load_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_its_path(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.001\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_recipe(path)


def test_bad_value_is_named_with_its_path_and_value(tmp_path):
    path = _write(tmp_path, "runtime:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"runtime\.precision: .*'fp8'"):
        load_recipe(path)
    path = _write(tmp_path, "optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be greater than 0"):
        load_recipe(path)


def test_invalid_yaml_reports_the_line(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(path)


def test_overrides(tmp_path):
    path = _write(tmp_path, "name: x\noptim:\n  lr: 0.001\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "data.img_size=64", "model.pretrained=false", "tracking.enabled=no"])
    assert recipe.optim.lr == 3e-4 and recipe.data.img_size == 64 and recipe.model.pretrained is False
    assert recipe.tracking.enabled is False
    recipe = load_recipe(path, ["model.backbone_kwargs.init_values=1e-4", "tracking.run_name=nan"])
    assert recipe.model.backbone_kwargs["init_values"] == 1e-4 and recipe.tracking.run_name == "nan"
    with pytest.raises(ConfigError, match=r"optim\.epochs"):
        load_recipe(path, ["optim.epochs=zero"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_recipe(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="model.colour: unknown key"):
        load_recipe(path, ["model.colour=red"])


def test_the_augment_section_is_the_data_layers_augment_options(tmp_path):
    """One augmentation type: the recipe's data.augment is fer_bench.data.AugmentOptions, validated like any section
    (unknown keys and out-of-range values named by their dotted path), and the data layer validates it alike."""
    from pydantic import ValidationError

    from fer_bench.data import AugmentOptions

    recipe = load_recipe(_write(tmp_path, "data:\n  augment:\n    rotate: 5\n    occluders: 0.3\n"))
    assert type(recipe.data.augment) is AugmentOptions
    assert recipe.data.augment == AugmentOptions(rotate=5.0, occluders=0.3)
    assert load_recipe(_write(tmp_path, "name: x\n")).data.augment == AugmentOptions()
    with pytest.raises(ConfigError, match=r"data\.augment\.rotate: Input should be less than or equal to 45"):
        load_recipe(_write(tmp_path, "data:\n  augment:\n    rotate: 50\n"))
    with pytest.raises(ConfigError, match=r"data\.augment\.hflp: unknown key\. Did you mean 'hflip'\?"):
        load_recipe(_write(tmp_path, "data:\n  augment:\n    hflp: 0.3\n"))
    with pytest.raises(ValidationError, match="hflp"):
        AugmentOptions(hflp=0.3)
    with pytest.raises(ValidationError, match="blur"):
        AugmentOptions(blur=1.5)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_a_recipe_is_a_file_first_then_a_shipped_name(tmp_path, monkeypatch):
    from fer_bench.train import resolve_recipe, shipped_recipes

    shipped = {r.name: r for r in shipped_recipes()}
    assert {p.stem for p in RECIPES} == set(shipped)  # every file of recipes/ is listed by name
    quickstart = shipped["quickstart"]
    assert quickstart.description.startswith("Quickstart: a small ViT") and "CPU ok" in quickstart.needs
    assert "GPU" in shipped["rafdb_vit_b16"].needs and "rafdb data" in shipped["rafdb_vit_b16"].needs
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("quickstart") == resolve_recipe("quickstart.yaml") == quickstart.path
    own = tmp_path / "quickstart"  # a file of that name in the current folder wins over the shipped recipe
    own.write_text("name: mine\n")
    assert (
        resolve_recipe("quickstart") == Path("quickstart") and load_recipe(resolve_recipe("quickstart")).name == "mine"
    )
    with pytest.raises(ConfigError, match=r"recipe 'quickstrat': no such file .* Did you mean 'quickstart'\?"):
        resolve_recipe("quickstrat")
    with pytest.raises(
        ConfigError,
        match=r"recipes/rafdb_vit_b16\.yaml: recipe file not found\. Did you mean the shipped recipe 'rafdb_vit_b16'",
    ):
        resolve_recipe("recipes/rafdb_vit_b16.yaml")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.weight_decy=0.1", "optim.weight_decy: unknown key. Did you mean 'weight_decay',"),
        ("data.imgsize=32", "data.imgsize: unknown key. Did you mean 'img_size'?"),
        ("tracking.uri=x", "tracking.uri: unknown key"),
    ],
)
def test_unknown_recipe_keys_suggest_the_nearest_keys_of_their_section(override, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe("recipes/quickstart.yaml", [override])
    assert expected in str(info.value)
