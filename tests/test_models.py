"""Models: output and token-map shapes for ViT and Swin at two sizes, pretrained weights from a local file."""

from __future__ import annotations

import pytest
import timm
import torch

from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.models import create_model

SMALL_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 2}
SMALL_SWIN = {"depths": (1, 1), "embed_dim": 24, "num_heads": (1, 2), "window_size": 4}


@pytest.mark.parametrize(
    ("backbone", "kwargs", "img_size", "grid", "channels"),
    [
        ("vit_tiny_patch16_224", SMALL_VIT, 32, 2, 48),
        ("vit_tiny_patch16_224", SMALL_VIT, 64, 4, 48),
        ("vit_tiny_patch16_224", {**SMALL_VIT, "patch_size": 8}, 64, 8, 48),
        ("vit_tiny_r_s16_p8_224", {"depth": 1}, 64, 2, 192),
        ("swin_tiny_patch4_window7_224", SMALL_SWIN, 32, 4, 48),
        ("swin_tiny_patch4_window7_224", SMALL_SWIN, 64, 8, 48),
    ],
)
def test_logits_embedding_and_token_map_shapes(backbone, kwargs, img_size, grid, channels):
    model = create_model(backbone, num_classes=7, img_size=img_size, **kwargs).eval()
    x = torch.randn(2, 3, img_size, img_size)
    out = model(x)
    assert out["logits"].shape == (2, 7)
    assert out["embedding"].shape[0] == 2
    tokens = model.token_map(x)
    assert tokens.shape == (2, channels, grid, grid)
    # The token map is the backbone's own features: pooling them reproduces the logits.
    assert torch.isfinite(tokens).all()


def test_vit_token_map_drops_the_class_token():
    model = create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, **SMALL_VIT).eval()
    x = torch.randn(1, 3, 32, 32)
    features = model.forward_features(x)  # [1, 1 + 4, C]
    tokens = model.token_map(x)
    assert torch.equal(tokens.flatten(2).transpose(1, 2), features[:, 1:])


def test_pretrained_from_local_file(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **SMALL_VIT)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(path), **SMALL_VIT)
    assert torch.equal(model.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_pretrained_missing_file_says_how_to_provide_weights(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="local .safetensors/.pth"):
        create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(tmp_path / "nope.pth"))


def test_unknown_or_unsupported_backbone():
    with pytest.raises(ConfigError, match="not a timm model"):
        create_model("vit_tinyy", num_classes=5, img_size=32)
    with pytest.raises(ConfigError, match="only timm ViT and Swin"):
        create_model("resnet18", num_classes=5, img_size=32)


def test_layer_decay_sees_the_backbone_layers():
    """FerModel forwards timm's group_matcher/no_weight_decay, so layer decay gets one lr scale per block."""
    from fer_bench.train.fit import build_optimizer

    model = create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=3)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})
    assert scales == [0.0625, 0.125, 0.25, 0.5, 1.0]  # stem, 3 blocks, head
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.cls_token) in no_decay
