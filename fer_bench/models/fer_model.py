"""FerModel: a timm backbone plus optional heads; ``forward`` returns a dict of named outputs."""

from __future__ import annotations

import os

import torch
from torch import nn

from fer_bench.models.backbone import (
    backbone_family,
    class_token_attention,
    create_backbone,
    forward_layers,
    num_layers,
    token_map,
)
from fer_bench.models.heads import HeadContext, check_head_options, create_head
from fer_bench.models.heads.au_heatmap import attention_from_tokens, default_attention_layer


class FerModel(nn.Module):
    """A FER classifier over a timm ViT or Swin, with optional heads.

    ``forward(x)`` returns a dict: ``logits`` [B, K] and ``embedding`` [B, D] always; with the ``au_heatmap`` head
    (or an attention probe set by the evaluator) ``attention`` [B, h, w] and ``cam`` [B, K, h', w']; with
    ``occlusion`` ``occlusion_score``/``occlusion_flags``/``occlusion_masked`` [B, h, w] (and ``reconstruction``
    [B, 3, S, S] while training or when asked); with ``anchors`` its distances and distributions, and while training
    ``train_logits`` (log of the reliability-balanced distribution) for the classification loss.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = backbone_family(backbone)
        self.num_classes = num_classes
        self.heads = nn.ModuleDict(heads or {})
        self.attention_probe: tuple[str, int] | None = None  # (kind, layer) to report without the au_heatmap head

    def head(self, name: str) -> nn.Module | None:
        return self.heads[name] if name in self.heads else None  # noqa: SIM401 (ModuleDict has no .get)

    def probe_attention(self) -> tuple[str, int]:
        """Make ``forward`` report attention maps as the ``au_heatmap`` head would (its settings if present, else
        a probe set beforehand as ``attention_probe = (kind, layer)``, else the head's defaults), for ATT-COS of any
        model; returns (kind, layer). Reset with ``attention_probe = None``."""
        au = self.head("au_heatmap")
        if au is not None:
            return au.attention, au.layer
        if self.attention_probe is None:
            self.attention_probe = ("channel_mean", default_attention_layer(self.family, num_layers(self.backbone)))
        return self.attention_probe

    def head_config(self) -> dict[str, dict]:
        """Each head's effective settings (recorded in evaluation results)."""
        return {name: head.config() for name, head in self.heads.items()}

    def rank_local_sums(self) -> list[str]:
        """State-dict names of buffers that sum what this process saw (the anchors' warm-up class means): a
        distributed checkpoint stores their sum over all ranks."""
        names = []
        for head_name, head in self.heads.items():
            names += [f"heads.{head_name}.{b}" for b in getattr(head, "rank_local_sums", ())]
        return names

    def zero_rank_local_sums(self) -> None:
        """Zero those buffers (ranks other than 0 after a distributed resume, so each sum is counted once)."""
        state = dict(self.named_buffers())
        for name in self.rank_local_sums():
            state[name].zero_()

    def has_unused_parameters(self) -> bool:
        """True when some weights get no gradient in a training step (DDP then needs find_unused_parameters)."""
        return any(getattr(head, "unused_parameters", False) for head in self.heads.values())

    def set_progress(self, fraction: float) -> None:
        """Tell the heads how far training is (0..1): the anchors' trust ramp and warm-up depend on it."""
        for head in self.heads.values():
            if hasattr(head, "set_progress"):
                head.set_progress(fraction)

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

    def _attention_spec(self) -> tuple[str, int] | None:
        au = self.head("au_heatmap")
        return (au.attention, au.layer) if au is not None else self.attention_probe

    def forward(
        self,
        x: torch.Tensor,
        *,
        occlusion_mask: torch.Tensor | None = None,
        reconstruct: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """x: [B, 3, S, S]; ``occlusion_mask`` [B, S, S] (known occluder pixels, training) feeds the occlusion
        head's detection target and teacher forcing; ``reconstruct`` (default: while training) runs its decoder."""
        attention = self._attention_spec()
        occlusion = self.head("occlusion")
        if attention is None and occlusion is None:
            features = self.forward_features(x)  # ViT [B, P+N, C]; Swin [B, H, W, C]
            out: dict[str, torch.Tensor] = {}
        else:
            n = num_layers(self.backbone)
            capture: set[int] = set()
            if attention is not None:
                capture.add(n - 2 if attention[0] == "cls_attention" else attention[1])
            state: dict[str, torch.Tensor] = {}
            edit = None
            if occlusion is not None:
                edit = lambda tokens: occlusion.edit(tokens, state, occlusion_mask)  # noqa: E731
            features, maps, prefix = forward_layers(
                self.backbone,
                x,
                capture=tuple(sorted(capture)),
                edit_layer=occlusion.layer if occlusion is not None else None,
                edit=edit,
            )
            out = dict(state)
            if attention is not None:
                kind, layer = attention
                if kind == "cls_attention":
                    tokens_in = torch.cat([prefix[n - 2], maps[n - 2].flatten(2).transpose(1, 2)], dim=1)
                    out["attention"] = class_token_attention(self.backbone, tokens_in)  # [B, h, w]
                else:
                    out["attention"] = attention_from_tokens(maps[layer], kind)  # [B, h, w]
                out["cam"] = self.class_activation_maps(features)  # [B, K, h', w']
            if occlusion is not None and (self.training if reconstruct is None else reconstruct):
                out["reconstruction"] = occlusion.decoder(token_map(self.backbone, features))  # [B, 3, S, S]
        embedding = self.backbone.forward_head(features, pre_logits=True)  # [B, D]
        logits = self.backbone.get_classifier()(embedding)  # [B, K]
        out |= {"logits": logits, "embedding": embedding}
        anchors = self.head("anchors")
        if anchors is not None:
            out |= anchors(embedding, logits)
        return out

    def class_activation_maps(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, h, w] class scores of every final token: the classifier applied per position after the same
        per-token norm the pooled path uses (a CAM for average pooling; TS-CAM-like for class-token pooling)."""
        tokens = token_map(self.backbone, features).permute(0, 2, 3, 1)  # [B, h, w, C]
        fc_norm = getattr(self.backbone, "fc_norm", None)
        if isinstance(fc_norm, nn.Module):
            tokens = fc_norm(tokens)
        classifier = self.backbone.get_classifier()
        return (
            classifier(tokens).permute(0, 3, 1, 2)
            if isinstance(classifier, nn.Linear)
            else tokens.new_zeros(tokens.shape[0], self.num_classes, *tokens.shape[1:3])
        )

    def losses(
        self,
        outputs: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        clean_outputs: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The heads' named loss terms for one batch (already weighted); the classification loss is the caller's."""
        terms: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            if name == "occlusion":
                terms |= head.losses(outputs, batch, clean_outputs)
            else:
                terms |= head.losses(outputs, batch)
        return terms


def head_context(backbone: nn.Module, *, num_classes: int, img_size: int) -> HeadContext:
    """Measure the backbone's layer shapes with one dry forward pass (no gradients)."""
    n = num_layers(backbone)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, img_size, img_size)
        features, maps, _ = forward_layers(backbone, x, capture=tuple(range(n)))
        embed_dim = backbone.forward_head(features, pre_logits=True).shape[-1]
    backbone.train(was_training)
    return HeadContext(
        family=backbone_family(backbone),
        num_classes=num_classes,
        embed_dim=int(embed_dim),
        img_size=img_size,
        layer_dims=tuple(int(maps[i].shape[1]) for i in range(n)),
        layer_grids=tuple((int(maps[i].shape[2]), int(maps[i].shape[3])) for i in range(n)),
    )


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
        pretrained: ``False``, a local weights file, a fer_bench checkpoint (its backbone; heads and classifier
            start fresh), or ``True`` (hub).
        heads: Head name → options (``au_heatmap``, ``anchors``, ``occlusion``; see :mod:`fer_bench.models.heads`).
        backbone_kwargs: ``stem`` (``patch`` or ``conv``, see :func:`create_backbone`) and extra timm arguments
            (``depth``, ``patch_size``, ``global_pool``, ``drop_path_rate``, ...).
    """
    heads = dict(heads or {})
    check_head_options(heads)
    net = create_backbone(
        backbone, num_classes=num_classes, img_size=img_size, pretrained=pretrained, **backbone_kwargs
    )
    modules = {}
    if heads:
        context = head_context(net, num_classes=num_classes, img_size=img_size)
        modules = {name: create_head(name, context, **(options or {})) for name, options in heads.items()}
    return FerModel(net, num_classes=num_classes, heads=modules)
