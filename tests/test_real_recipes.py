"""Each real-dataset recipe validates and runs 2 optimiser steps on a fixture tree in the dataset's own format.

The architecture (ViT-B/16 or Swin-T width, heads, patching) is the recipe's; only depth and image size are cut so
two steps take seconds on a CPU. The real runs need the datasets and a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_bench.models.checkpoint import load_checkpoint
from fer_bench.train import fit, load_recipe
from tests import formats

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FIXTURES = {
    "rafdb": lambda root: formats.write_rafdb_official(root, per_code_train=3),
    "affectnet7": lambda root: formats.write_affectnet_csv(root, per_code=3),
    "affectnet8": lambda root: formats.write_affectnet_npy(root, per_code=3),
    "ferplus": lambda root: formats.write_ferplus_folders(root, per_class=2),
    "infer": lambda root: formats.write_infer(root),
}
REAL_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if p.stem != "quickstart")
HEAD_RECIPES = {
    "rafdb_vit_b16_occlusion": {"occlusion"},
    "affectnet7_vit_b16_au": {"au_heatmap"},
    "ferplus_swin_t_anchors": {"anchors"},
    "rafdb_swin_t_heads": {"au_heatmap", "anchors", "occlusion"},
}


def test_every_dataset_has_a_vit_and_a_swin_recipe():
    names = {p.stem for p in REAL_RECIPES}
    assert names == {f"{d}_{b}" for d in FIXTURES for b in ("vit_b16", "swin_t")} | set(HEAD_RECIPES)


def test_head_recipes_use_their_heads_and_plain_recipes_none():
    for path in REAL_RECIPES:
        assert set(load_recipe(path).model.heads) == HEAD_RECIPES.get(path.stem, set()), path.stem


@pytest.mark.parametrize("path", REAL_RECIPES, ids=lambda p: p.stem)
def test_real_recipe_runs_two_steps_on_its_fixture(path, tmp_path):
    dataset_key = path.stem.split("_")[0]
    backbone_key = path.stem.split("_", 1)[1]
    recipe = load_recipe(path)  # the recipe as shipped validates
    assert recipe.data.img_size == 224 and recipe.optim.layer_decay and recipe.model.pretrained is True
    root = FIXTURES[dataset_key](tmp_path / "data")
    vit_depth = 2 if "occlusion" in recipe.model.heads else 1  # the mask token needs a block after it
    depth = (
        "model.backbone_kwargs.depths=[1, 1, 1, 1]"
        if "swin" in backbone_key
        else f"model.backbone_kwargs.depth={vit_depth}"
    )
    recipe = load_recipe(
        path,
        [
            f"data.root={root}",
            "data.img_size=64",
            "model.pretrained=false",
            depth,
            "optim.batch_size=4",
            "runtime.max_steps=2",
            "runtime.workers=0",
            "tracking.enabled=false",  # MLflow is tested elsewhere; here it would only add store set-up time
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = fit(recipe)
    assert result.epochs_run == 1 and len(result.summary) == 1
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["scheduler"]["last_epoch"] == 2  # exactly two optimiser steps
    assert result.test_results["n"] > 0
    splits = {"rafdb": "RAF-DB basic", "affectnet7": "AffectNet-7", "affectnet8": "AffectNet-8", "ferplus": "FERPlus"}
    assert result.test_results["dataset_splits"].startswith(splits.get(dataset_key, "InFER"))  # the recipe's dataset
    heads = HEAD_RECIPES.get(path.stem, set())
    assert set(result.test_results["config"]["heads"]) == heads
    losses = {key for key in result.summary[0] if key.startswith("loss_")}
    expected = {"au_heatmap": {"loss_au_align"}, "anchors": {"loss_anchor_center"}, "occlusion": {"loss_occ_recon"}}
    assert set().union(*(expected[h] for h in heads)) <= losses
