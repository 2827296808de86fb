"""timm ViT and Swin backbones behind one contract: pooled embedding, logits and a [B, C, H, W] token map."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fer_bench.errors import ConfigError, WeightsUnavailableError
from fer_bench.models.conv_stem import ConvStemPatchEmbed

SUPPORTED_FAMILIES = ("vit", "swin")
_SUPPORTED_MODULES = ("vision_transformer", "vision_transformer_hybrid", "swin_transformer")


def backbone_family(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise ConfigError(f"backbone {type(model).__name__}: only timm ViT and Swin models are supported")


def create_backbone(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    pretrained: bool | str | os.PathLike = False,
    stem: str = "patch",
    **kwargs,
) -> nn.Module:
    """Create a timm ViT or Swin with ``num_classes`` outputs at ``img_size``.

    Args:
        name: A timm model name of the ViT (incl. hybrid) or Swin family, e.g. ``vit_tiny_patch16_224``, optionally
            with a weights tag (``vit_base_patch16_224.augreg_in21k_ft_in1k``).
        pretrained: ``False`` (random init), a local weights file (.safetensors/.pth/.bin), or ``True`` (the hub).
        stem: ``patch`` (the architecture's own) or ``conv`` (ViT only: a BatchNorm conv stem, see
            :mod:`fer_bench.models.conv_stem`; faster to train from scratch, not compatible with pretrained weights).
        kwargs: Passed to ``timm.create_model`` (e.g. ``depth``, ``patch_size``, ``drop_path_rate``); ``None``
            values are dropped.
    """
    architecture, tag = timm.models.split_model_name_tag(name)  # "vit_base_patch16_224.augreg_in21k" has a weights tag
    if architecture not in timm.list_models():
        close = timm.list_models(f"*{architecture.split('_')[0]}*")[:5]
        raise ConfigError(f"model.backbone {name!r}: not a timm model name; e.g. {close}")
    if tag and name not in timm.list_models(architecture, pretrained=True):
        tags = timm.list_models(architecture, pretrained=True)[:6]
        raise ConfigError(f"model.backbone {name!r}: timm has no weights tagged {tag!r}; e.g. {tags}")
    module = timm.models.model_entrypoint(architecture).__module__.rsplit(".", 1)[-1]
    if module not in _SUPPORTED_MODULES:
        raise ConfigError(
            f"model.backbone {name!r}: only timm ViT and Swin models are supported (this one is from {module}.py)"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if stem == "conv":
        if module != "vision_transformer":
            raise ConfigError(f"model.stem='conv' applies to plain ViTs; {name!r} is from {module}.py")
        if pretrained:
            raise ConfigError("model.stem='conv' trains a new stem: use it with model.pretrained=false")
        kwargs["embed_layer"] = ConvStemPatchEmbed
    elif stem != "patch":
        raise ConfigError(f"model.stem: expected 'patch' or 'conv', got {stem!r}")
    build = dict(num_classes=num_classes, img_size=img_size, **kwargs)
    if pretrained is False or pretrained is None:
        try:
            model = timm.create_model(name, pretrained=False, **build)
        except (TypeError, ValueError, AssertionError) as exc:
            shown = {k: v for k, v in kwargs.items() if k != "embed_layer"}
            raise ConfigError(f"model {name!r} with {shown} at img_size {img_size}: {exc}") from None
    elif pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True, **build)
        except Exception as exc:  # network, hub or missing-weights errors all end here
            raise WeightsUnavailableError(
                f"model.pretrained=true: could not fetch {name!r} weights from the hub ({type(exc).__name__}). "
                "Offline, download the weights elsewhere and pass a local file: "
                f"--set model.pretrained=/path/{name}.safetensors"
            ) from None
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsUnavailableError(
                f"model.pretrained={path}: no such file. Pass a local .safetensors/.pth file of {name!r} weights, "
                f"true for the hub, or false for random init"
            )
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **build)
    backbone_family(model)
    return model


def token_map(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Spatial tokens of ``forward_features`` output as [B, C, H, W], for ViT and Swin alike.

    ViT: [B, prefix + H*W, C] → drop the prefix (class/register) tokens → [B, C, H, W].
    Swin: [B, H, W, C] (NHWC) → [B, C, H, W].
    """
    if isinstance(model, VisionTransformer):
        patches = features[:, model.num_prefix_tokens :]  # [B, H*W, C]
        h, w = (
            model.patch_embed.dynamic_feat_size(model.patch_embed.img_size)
            if hasattr(model.patch_embed, "dynamic_feat_size")
            else model.patch_embed.grid_size
        )
        return patches.transpose(1, 2).reshape(features.shape[0], features.shape[-1], h, w)
    if isinstance(model, SwinTransformer):
        return features.permute(0, 3, 1, 2)  # [B, H, W, C] → [B, C, H, W]
    raise ConfigError(f"token_map: unsupported backbone {type(model).__name__}")
