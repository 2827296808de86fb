"""``au_heatmap``: align the model's spatial attention with action-unit maps while training.

Belharbi et al., "Guided Interpretable Facial Expression Recognition via Spatial Action Unit Cues", FG 2024. For each
training image with a map (the label's codebook AUs drawn from its landmarks after augmentation, see
:mod:`fer_bench.data.au_maps`), the loss pulls an attention map of one layer towards the AU map; nothing changes at
test time (no landmarks, no extra input). Samples without a map (neutral, contempt) are left out of the loss.

Loss: λ · mean over samples with a map of (1 − cos(vec A_l(x), vec M↓)), M↓ = the AU map area-averaged to the layer's
token grid (antialiased, like the authors' ``scale_to_attention``).

Options (recipe ``model.heads.au_heatmap``):
    attention: ``channel_mean`` (default; the paper's layer-wise attention: mean over channels of the layer's
        residual-stream tokens, before the final norm), ``token_norm`` (L2 norm of each token) or ``cls_attention``
        (ViT only: class-token → patch attention of the last block, averaged over heads).
    layer: Which layer's tokens (ViT block / Swin stage index, negative from the end). Default: the last ViT block
        (14 x 14 at 224 px for /16 patches), the second-to-last Swin stage (14 x 14 at 224 px; the last is 7 x 7).
        Ignored by ``cls_attention``.
    weight: λ (default 4.0, the paper's RAF-DB value; 9.0 was its AffectNet value).
    maps: Which AU maps the data provides: ``codebook`` (default: the label's codebook AUs on 68 landmarks, 5-point
        landmarks fitted to a mean template, the per-class template where a row has none), ``generic`` (all codebook
        AUs: class-agnostic), ``template`` (per-class template maps only). The source of each map is counted and
        logged by training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_bench.errors import ConfigError
from fer_bench.models.heads._base import HeadContext, check_range
from fer_bench.runtime import global_mean

ATTENTION_KINDS: tuple[str, ...] = ("channel_mean", "token_norm", "cls_attention")
MAP_KINDS: tuple[str, ...] = ("codebook", "generic", "template")


def default_attention_layer(family: str, num_layers: int) -> int:
    """The last ViT block; the second-to-last Swin stage (both 14 x 14 at 224 px)."""
    return num_layers - 1 if family == "vit" or num_layers < 2 else num_layers - 2


def attention_from_tokens(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, H, W] attention of a [B, C, H, W] token map: channel mean or per-token L2 norm.

    Example:
        >>> t = torch.zeros(1, 2, 1, 2); t[0, :, 0, 1] = torch.tensor([3.0, 4.0])
        >>> attention_from_tokens(t, "channel_mean").tolist(), attention_from_tokens(t, "token_norm").tolist()
        ([[[0.0, 3.5]]], [[[0.0, 5.0]]])
    """
    if kind == "channel_mean":
        return tokens.mean(dim=1)
    if kind == "token_norm":
        return tokens.norm(dim=1)
    raise ConfigError(f"attention {kind!r}: computed from tokens are {ATTENTION_KINDS[:2]}")


def alignment_loss(attention: torch.Tensor, heatmap: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over valid samples of 1 − cos(attention, heatmap at the attention's resolution); 0 when none is valid.

    attention [B, h, w]; heatmap [B, S, S] in [0, 1]; valid [B] bool. Computed with weights rather than by
    selecting the valid rows, so it never asks the device how many there are (no host sync inside a step).

    Example:
        >>> a = torch.zeros(2, 2, 2); a[:, 0, 0] = 1.0
        >>> m = torch.zeros(2, 4, 4); m[:, :2, :2] = 1.0
        >>> float(alignment_loss(a, m, torch.tensor([True, False])))
        0.0
    """
    target = F.adaptive_avg_pool2d(heatmap.unsqueeze(1).float(), attention.shape[-2:]).flatten(1)  # [B, h*w]
    # (under DDP the mean is over every rank's valid samples: runtime.global_mean)
    cos = F.cosine_similarity(attention.flatten(1).float(), target, dim=1, eps=1e-8)  # [B]
    weight = valid.to(cos.dtype)
    return global_mean(((1 - cos) * weight).sum(), weight.sum())


class AUHeatmapHead(nn.Module):
    """Training-time attention guidance; no parameters."""

    name = "au_heatmap"

    def __init__(
        self,
        context: HeadContext,
        *,
        attention: str = "channel_mean",
        layer: int | None = None,
        weight: float = 4.0,
        maps: str = "codebook",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ConfigError(
                f"model.heads.au_heatmap.attention: expected one of {list(ATTENTION_KINDS)}, got {attention!r}"
            )
        if attention == "cls_attention" and context.family != "vit":
            raise ConfigError("model.heads.au_heatmap.attention='cls_attention' needs a ViT (Swin has no class token)")
        if maps not in MAP_KINDS:
            raise ConfigError(f"model.heads.au_heatmap.maps: expected one of {list(MAP_KINDS)}, got {maps!r}")
        self.attention = attention
        if layer is None:
            layer = default_attention_layer(context.family, context.num_layers)
        self.layer = context.layer(layer, option="model.heads.au_heatmap.layer")
        self.weight = check_range("model.heads.au_heatmap.weight", weight, 0.0)
        self.maps = maps

    def config(self) -> dict:
        return {"attention": self.attention, "layer": self.layer, "weight": self.weight, "maps": self.maps}

    def losses(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        valid = batch["heatmap_valid"].to(outputs["attention"].device)
        heatmap = batch["heatmap"].to(outputs["attention"].device)
        return {"au_align": self.weight * alignment_loss(outputs["attention"], heatmap, valid)}
