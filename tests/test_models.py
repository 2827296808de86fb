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
        ("vit_tiny_patch16_224", {**SMALL_VIT, "patch_size": 8, "global_pool": "avg"}, 32, 4, 48),
        ("vit_tiny_r_s16_p8_224", {"depth": 1}, 64, 2, 192),
        ("swin_tiny_patch4_window7_224", SMALL_SWIN, 32, 4, 48),
        ("swin_tiny_patch4_window7_224", SMALL_SWIN, 64, 8, 48),
    ],
)
def test_logits_embedding_and_token_map_shapes(backbone, kwargs, img_size, grid, channels):
    torch.manual_seed(0)
    model = create_model(backbone, num_classes=7, img_size=img_size, **kwargs).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        out = model(x)
        tokens = model.token_map(x)
    assert out["logits"].shape == (2, 7)
    assert out["embedding"].shape == (2, channels)
    assert tokens.shape == (2, channels, grid, grid)

    # The pooling the model claims, computed independently: the same weights in a plain timm model, pooled by hand
    # from timm's own forward_features (ViT [B, prefix + N, C] after the final norm; Swin [B, H, W, C]).
    reference = timm.create_model(backbone, num_classes=7, img_size=img_size, **kwargs).eval()
    reference.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        features = reference.forward_features(x)
        if backbone.startswith("swin"):
            assert features.shape == (2, grid, grid, channels)
            pooled = features.mean(dim=(1, 2))  # Swin: the mean of the final tokens
            from_map = tokens.mean(dim=(2, 3))
        elif kwargs.get("global_pool") == "avg":
            patches = features[:, reference.num_prefix_tokens :]  # [B, N, C]: the class token left out of the mean
            pooled = reference.fc_norm(patches.mean(dim=1))  # timm normalises after averaging when pooling avg
            from_map = reference.fc_norm(tokens.mean(dim=(2, 3)))
        else:
            pooled = features[:, 0]  # the class token, already normalised
            from_map = None
        expected_logits = reference.get_classifier()(pooled)
    torch.testing.assert_close(out["embedding"], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], reference(x).detach(), rtol=1e-5, atol=1e-5)
    if from_map is not None:  # average pooling: the token map holds exactly the tokens that are averaged
        torch.testing.assert_close(out["embedding"], from_map, rtol=1e-5, atol=1e-5)
    else:  # class-token pooling: the embedding is not the mean of the patch tokens (the token map leaves it out)
        assert not torch.allclose(out["embedding"], tokens.mean(dim=(2, 3)), atol=1e-3)


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
