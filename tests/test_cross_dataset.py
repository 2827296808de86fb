"""Scoring a model on a dataset with another label space goes through the canonical names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_bench.data import get_dataset
from fer_bench.errors import ConfigError
from fer_bench.eval import evaluate
from fer_bench.eval.results import label_alignment
from fer_bench.models import create_model
from tests import formats

BASIC7 = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
ALL8 = (*BASIC7, "contempt")


def _model(num_classes: int, favour: int | None = None):
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    )
    if favour is not None:  # this class wins every argmax unless its logit is masked
        with torch.no_grad():
            model.backbone.get_classifier().bias[favour] = 1e4
    return model


def test_alignment_table():
    a = label_alignment(BASIC7, ALL8)
    assert a == {"scored": list(BASIC7), "masked_logits": [], "dropped_classes": ["contempt"]}
    with pytest.raises(ConfigError, match="no class in common"):
        label_alignment(("neutral",), ("anger",))


def test_eight_class_model_on_seven_class_data_masks_contempt(tmp_path):
    info = get_dataset("fer2013", formats.write_class_folders(tmp_path / "fer", per_class=2))
    results = evaluate(_model(8, favour=7), info, split="test", img_size=32, label_names=ALL8)
    assert results["cross_dataset"]["masked_logits"] == ["contempt"]
    assert results["n"] == 14 and np.asarray(results["confusion_matrix"]).sum() == 14


def test_seven_class_model_on_eight_class_data_drops_contempt_rows(tmp_path):
    root = formats.write_class_folders(tmp_path / "f", splits=("test",), names=("happy", "contempt", "angry"))
    info = get_dataset("folder", root)
    results = evaluate(_model(7, favour=1), info, split="test", img_size=32, label_names=BASIC7)
    assert results["cross_dataset"]["dropped_rows"] == {"contempt": 2}
    assert results["n"] == 4
    # happiness favoured: the 2 happy rows are right, the 2 angry rows wrong
    assert results["metrics"]["acc"] == 0.5
    assert results["per_class"]["happiness"]["recall"] == 1.0


def test_compound_taxonomy_cannot_be_crossed(tmp_path):
    info = get_dataset("rafdb-compound", formats.write_rafdb_compound(tmp_path / "c"))
    with pytest.raises(ConfigError, match="its own taxonomy"):
        evaluate(_model(7), info, split="test", img_size=32, label_names=BASIC7)


def test_eval_hooks_land_in_the_report(tiny_synthfer, tmp_path):
    """A head metric sees every batch with the model's outputs and lands in the results, the report and the flat
    MLflow names."""
    from fer_bench.eval import EvalHook, write_report
    from fer_bench.train.tracking import flat_metrics

    info = get_dataset("synthfer", tiny_synthfer)

    class OccludedConfidence(EvalHook):
        name = "occlusion"

        def __init__(self):
            self.seen, self.confident = 0, 0.0

        def update(self, batch, outputs):
            self.seen += len(batch["index"])
            self.confident += outputs["logits"].softmax(1).max(1).values.sum().item()

        def result(self):
            return {"images": self.seen, "mean_confidence": self.confident / self.seen}

    hook = OccludedConfidence()
    results = evaluate(_model(8), info, split="test", img_size=32, label_names=ALL8, hooks=[hook], n_bootstrap=0)
    assert results["heads"]["occlusion"]["images"] == 48
    assert 0 < results["heads"]["occlusion"]["mean_confidence"] <= 1
    assert "test/heads/occlusion/mean_confidence" in flat_metrics(results)
    paths = write_report(results, tmp_path / "ev")
    assert "## Head metrics: occlusion" in paths["report"].read_text()
