"""Soft targets (FERPlus modes), class-balanced sampling and the carved validation split, through ``fit``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_bench.data import get_dataset, with_validation_split
from fer_bench.data.sampling import epoch_order
from fer_bench.train import fit, recipe_from_dict
from fer_bench.train.losses import MULTI_TARGET_EPSILON, classification_loss
from tests import formats
from tests.conftest import tiny_recipe_dict


def test_multi_target_loss_counts_any_chosen_class_as_right():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])  # both rows: class 0 or 1 is right
    loss = classification_loss(logits, labels=torch.tensor([0, 0]), target=target, target_kind="multi_target")
    p = logits.softmax(1)
    chosen = p[:, :2].max(1).values  # the most probable chosen class: weight (1 - ε) + ε = 1
    assert torch.isclose(loss, -torch.log(chosen).mean(), atol=1e-6)
    soft = classification_loss(logits, labels=torch.tensor([0, 0]), target=target, target_kind="soft")
    assert soft > loss  # cross-entropy against (0.5, 0.5) penalises the confident rows


def test_multi_target_epsilon_bounds_the_loss_of_a_confidently_wrong_row():
    """t' = (1-ε)·[t > 0] + ε gives every class a weight of at least ε: when the model puts so much on an unchosen
    class that ε·p_unchosen > p_chosen, the max picks that class and the loss is capped near -log ε."""
    logits = torch.tensor([[0.0, 0.0, 12.0], [4.0, 0.0, 0.0]])  # row 0: confidently wrong; row 1: right
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    p = logits.softmax(1)
    assert MULTI_TARGET_EPSILON * p[0, 2] > p[0, :2].max()  # the input reaches the ε branch
    loss = classification_loss(logits, labels=torch.tensor([0, 0]), target=target, target_kind="multi_target")
    with_epsilon = -torch.log(torch.stack([MULTI_TARGET_EPSILON * p[0, 2], p[1, 0]])).mean()
    without_epsilon = -torch.log(torch.stack([p[0, :2].max(), p[1, 0]])).mean()  # max over the chosen classes only
    assert torch.isclose(loss, with_epsilon, rtol=1e-5)
    assert without_epsilon - loss > 2.0  # ε caps row 0 at -log(0.001) ≈ 6.9 instead of ≈ 12
    # a row the model gets right is untouched by ε
    right = classification_loss(logits[1:], labels=torch.tensor([0]), target=target[1:], target_kind="multi_target")
    assert torch.isclose(right, -torch.log(p[1, 0]), rtol=1e-6)


@pytest.mark.parametrize("mode", ["crossentropy", "probability", "multi_target"])
def test_fit_trains_on_ferplus_soft_targets(tmp_path, mode):
    root = formats.write_ferplus_csv(tmp_path / "fp", per_class=1)
    recipe = tiny_recipe_dict(root, tmp_path, **{"optim.epochs": 1, "optim.batch_size": 4})
    recipe["data"] |= {"dataset": "ferplus", "options": {"mode": mode}}
    recipe["tracking"]["enabled"] = False
    result = fit(recipe_from_dict(recipe))
    assert np.isfinite(result.summary[0]["train_loss"]) and result.summary[0]["train_loss"] > 0
    assert "train mode " + mode in result.test_results["dataset_splits"]


def test_class_balanced_sampler_draws_classes_evenly():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    drawn = epoch_order(len(labels), seed=0, epoch=3, sampler="class_balanced", labels=labels)
    counts = np.bincount(labels[drawn], minlength=3)
    assert len(drawn) == 1000 and counts.min() > 270  # ~333 each, against 900/90/10 in the data
    again = epoch_order(len(labels), seed=0, epoch=3, sampler="class_balanced", labels=labels)
    assert (drawn == again).all()
    assert not (drawn == epoch_order(len(labels), seed=0, epoch=4, sampler="class_balanced", labels=labels)).all()


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    info = get_dataset("rafdb", formats.write_rafdb_official(tmp_path / "raf", per_code_train=10))
    carved = with_validation_split(info, fraction=0.2, seed=5)
    val, train = carved.split("val"), carved.split("train")
    assert len(val) == 14 and len(train) == 56  # 2 of 10 per class
    assert set(val["label"].value_counts()) == {2}
    assert not set(val["image_id"]) & set(train["image_id"])
    assert (
        with_validation_split(info, fraction=0.2, seed=5).split("val")["image_id"].tolist() == val["image_id"].tolist()
    )
    assert "val = 20% of train" in carved.splits
    assert with_validation_split(carved, fraction=0.5, seed=0) is carved  # a val split is kept as it is
