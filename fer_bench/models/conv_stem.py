"""A convolutional stem for timm ViTs ("Early Convolutions Help Transformers See Better", Xiao et al., NeurIPS 2021).

ViT's patchify stem (one p x p stride-p convolution) makes transformers slow to start learning from scratch and
sensitive to the learning rate; a stack of 3x3 stride-2 convolutions with BatchNorm and ReLU, then a 1x1 projection,
converges several times faster at about the same cost. ``ConvStemPatchEmbed`` is a drop-in ``embed_layer`` for
``timm.models.vision_transformer.VisionTransformer``: it keeps timm's PatchEmbed interface (grid size, flattening,
dynamic sizes), so the token map, position embeddings and heads work unchanged.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn

from fer_bench.errors import ConfigError


class ConvStemPatchEmbed(PatchEmbed):
    """timm PatchEmbed whose projection is log2(patch) stride-2 3x3 conv-BN-ReLU stages plus a 1x1 conv.

    Channels start at ``embed_dim / 2**(stages-1) / 2`` (at least 16) and double each stage.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        stages = int(round(math.log2(patch)))
        if 2**stages != patch or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"conv stem needs a square power-of-two patch size, got {self.patch_size}")
        size = self.img_size[0] if self.img_size else None
        if size is not None and size % patch:
            # stride-2 convolutions round odd sizes up, so the token grid would not be img_size / patch
            lower, upper = size - size % patch, size - size % patch + patch
            raise ConfigError(
                f"img_size={size} (data.img_size in a recipe): the conv stem downsamples by {patch}, so the side must "
                f"be a multiple of {patch}, e.g. {lower or upper} or {upper}"
            )
        in_chans = self.proj.in_channels
        embed_dim = self.proj.out_channels
        width = max(32, embed_dim // 2**stages)
        layers: list[nn.Module] = []
        channels = in_chans
        for stage in range(stages):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if stage > 0:  # a stride-1 conv per stage after the first: a stronger local prior for small data
                layers += [
                    nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
            channels, width = width, min(width * 2, embed_dim)
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)  # [B, 3, H, W] -> [B, D, H/p, W/p]
