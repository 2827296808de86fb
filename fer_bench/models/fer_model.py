"""FerModel: a timm backbone plus optional heads; ``forward`` returns a dict of named outputs."""

from __future__ import annotations

import os

import torch
from torch import nn

from fer_bench.errors import ConfigError
from fer_bench.models.backbone import backbone_family, create_backbone, token_map


class FerModel(nn.Module):
    """A FER classifier over a timm ViT or Swin.

    ``forward(x)`` returns ``{"logits": [B, K], "embedding": [B, D]}``; heads (a later addition) add their own keys.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = backbone_family(backbone)
        self.num_classes = num_classes
        self.heads = nn.ModuleDict(heads or {})

    # timm's optimizer factory reads these two hooks: without them layer-wise lr decay silently puts every parameter
    # in one group and position embeddings get weight decay, because the backbone sits under the "backbone." prefix.
    def no_weight_decay(self) -> set[str]:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in names}

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's layer groups (for layer-wise lr decay) with its patterns moved under ``backbone.``."""

        def moved(pattern):
            if isinstance(pattern, str):
                return pattern.replace("^", r"^backbone\.", 1) if pattern.startswith("^") else r"backbone\." + pattern
            if isinstance(pattern, list | tuple) and pattern and isinstance(pattern[0], tuple):
                return [(moved(p), rest) for p, rest in pattern]
            return pattern

        return {key: moved(value) for key, value in self.backbone.group_matcher(coarse=coarse).items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # ViT [B, P+N, C]; Swin [B, H, W, C]

    def token_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] spatial tokens of image batch ``x``."""
        return token_map(self.backbone, self.forward_features(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)  # x: [B, 3, S, S]
        embedding = self.backbone.forward_head(features, pre_logits=True)  # [B, D]
        logits = self.backbone.get_classifier()(embedding)  # [B, K]
        return {"logits": logits, "embedding": embedding}


def create_model(
    backbone: str,
    *,
    num_classes: int,
    img_size: int,
    pretrained: bool | str | os.PathLike = False,
    heads: dict | None = None,
    **backbone_kwargs,
) -> FerModel:
    """Create a :class:`FerModel`.

    Args:
        backbone: timm ViT or Swin name (``vit_tiny_patch16_224``, ``swin_tiny_patch4_window7_224``, hybrids such as
            ``vit_tiny_r_s16_p8_224``), at any ``img_size`` the architecture allows.
        num_classes: Size of the label space.
        pretrained: ``False``, a local weights file, or ``True`` (hub).
        heads: Head name → options. No heads are available yet; a non-empty dict raises ConfigError.
        backbone_kwargs: ``stem`` (``patch`` or ``conv``, see :func:`create_backbone`) and extra timm arguments
            (``depth``, ``patch_size``, ``global_pool``, ``drop_path_rate``, ...).
    """
    if heads:
        raise ConfigError(f"model.heads: no heads are available in this version, got {sorted(heads)}")
    net = create_backbone(
        backbone, num_classes=num_classes, img_size=img_size, pretrained=pretrained, **backbone_kwargs
    )
    return FerModel(net, num_classes=num_classes)
