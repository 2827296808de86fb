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
from fer_bench.models.checkpoint import fer_bench_checkpoint
from fer_bench.models.conv_stem import ConvStemPatchEmbed
from fer_bench.registry import did_you_mean

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
        pretrained: ``False`` (random init), a local weights file (.safetensors/.pth/.bin), a fer_bench checkpoint
            (``best.pt``: its backbone weights, loaded strictly; the classifier starts fresh), or ``True`` (the hub).
        stem: ``patch`` (the architecture's own) or ``conv`` (ViT only: a BatchNorm conv stem, see
            :mod:`fer_bench.models.conv_stem`; faster to train from scratch; hub weights do not fit it, a local file
            of a conv-stem backbone does).
        kwargs: Passed to ``timm.create_model`` (e.g. ``depth``, ``patch_size``, ``drop_path_rate``); ``None``
            values are dropped.
    """
    architecture, tag = timm.models.split_model_name_tag(name)  # "vit_base_patch16_224.augreg_in21k" has a weights tag
    if architecture not in timm.list_models():
        families = [m for m in timm.list_models() if m.startswith(("vit_", "swin", "deit", "beit"))]
        hint = did_you_mean(architecture, families, n=3, cutoff=0.6) or " e.g. 'vit_tiny_patch16_224'"
        raise ConfigError(f"model.backbone {name!r}: not a timm model name.{hint}")
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
        if pretrained is True:
            raise ConfigError(
                "model.stem='conv' has no hub weights: use model.pretrained=false, or a local file of a conv-stem "
                "model trained with fer_bench"
            )
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
                f"a fer_bench checkpoint (best.pt), true for the hub, or false for random init"
            )
        state = fer_bench_checkpoint(path)
        if state is not None:
            model = timm.create_model(name, pretrained=False, **build)
            load_backbone_from_checkpoint(model, state, path=path)
        else:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **build)
    backbone_family(model)
    return model


def _classifier_prefix(model: nn.Module) -> str | None:
    """The state-dict prefix of the backbone's classifier (``head.`` for a ViT, ``head.fc.`` for a Swin)."""
    classifier = model.get_classifier()
    for module_name, module in model.named_modules():
        if module is classifier and module_name:
            return module_name + "."
    return None


def load_backbone_from_checkpoint(model: nn.Module, state: dict, *, path: str | os.PathLike) -> None:
    """Load the backbone weights of a fer_bench checkpoint (``state["model"]``, keys ``backbone.*``) into ``model``,
    a freshly built timm backbone, strictly: every key but the classifier's must be there with the same shape. The
    classifier (another task's classes) keeps its fresh initialisation; the checkpoint's heads are not used.

    Raises:
        CheckpointError: the checkpoint holds another backbone (or shape), naming the file and the first key that
            does not fit.
    """
    from fer_bench.errors import CheckpointError

    prefix = _classifier_prefix(model)
    fresh = {k: v for k, v in model.state_dict().items() if not (prefix and k.startswith(prefix))}
    given = {
        key.removeprefix("backbone."): value
        for key, value in state["model"].items()
        if key.startswith("backbone.") and not (prefix and key.removeprefix("backbone.").startswith(prefix))
    }
    config = state.get("model_config") or {}
    other = f"a checkpoint of {config.get('backbone', '?')} at img_size {config.get('img_size', '?')}"
    problem = None
    for key, value in fresh.items():
        if key not in given:
            problem = f"{key!r} is missing from it"
        elif tuple(given[key].shape) != tuple(value.shape):
            problem = f"{key!r} has shape {list(given[key].shape)} there, {list(value.shape)} here"
        if problem:
            break
    if problem is None:
        extra = next((key for key in given if key not in fresh), None)
        if extra is not None:
            problem = f"{extra!r} is in it but not in this backbone"
    if problem is not None:
        raise CheckpointError(
            f"model.pretrained={path}: {other}, which does not fit this backbone; first mismatching key: {problem}"
        )
    missing, unexpected = model.load_state_dict(given, strict=False)
    left = [key for key in missing if not (prefix and key.startswith(prefix))]
    if left or unexpected:  # the checks above make this unreachable; a timm change would land here
        raise CheckpointError(
            f"model.pretrained={path}: weights do not fit (missing {left[:3]}, unexpected {unexpected[:3]})"
        )


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's fused attention (``F.scaled_dot_product_attention``) on or off in every attention layer of
    ``model`` (ViT ``Attention``, Swin ``WindowAttention``); returns how many layers were set.

    On GPUs the fused kernels (cuDNN, flash, efficient) are the fast path, and Swin only takes it when asked (timm
    marks its fused window attention experimental). On CPUs the plain matmul-softmax path is faster for short
    sequences. The weights are the same either way.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and isinstance(module.fused_attn, bool):
            module.fused_attn = bool(enabled)
            count += 1
    return count


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


def num_layers(model: nn.Module) -> int:
    """How many layers :func:`forward_layers` counts: transformer blocks for a ViT, stages for a Swin."""
    return len(model.blocks) if isinstance(model, VisionTransformer) else len(model.layers)


def forward_layers(
    model: nn.Module,
    x: torch.Tensor,
    *,
    capture: tuple[int, ...] = (),
    edit_layer: int | None = None,
    edit=None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``forward_features`` that also returns layer outputs and can replace one layer's tokens on the way.

    The layers up to ``max(capture)`` (or ``edit_layer``) run through timm's ``forward_intermediates`` (with
    ``stop_early``); after an edit the remaining layers run on the edited tokens. Layer outputs are the residual
    stream before the final norm, as [B, C, H, W] token maps for both families.

    Args:
        capture: Layer indices whose outputs to return.
        edit_layer: Layer after which ``edit`` replaces the token map: ``edit([B, C, H, W]) -> [B, C, H, W]``.

    Returns:
        (features as ``forward_features`` gives them, {layer: [B, C, H, W]}, {layer: [B, P, C] ViT prefix tokens}).
    """
    n = num_layers(model)
    is_vit = isinstance(model, VisionTransformer)
    split = edit_layer if edit_layer is not None else max(capture, default=n - 1)
    first = sorted({i for i in capture if i <= split} | {split})
    if is_vit:
        out = model.forward_intermediates(
            x, indices=first, return_prefix_tokens=True, stop_early=True, intermediates_only=True
        )
        maps = {i: m for i, (m, _) in zip(first, out, strict=True)}
        prefix = {i: p for i, (_, p) in zip(first, out, strict=True)}
    else:
        out = model.forward_intermediates(x, indices=first, stop_early=True, intermediates_only=True)
        maps, prefix = dict(zip(first, out, strict=True)), {}
    current = maps[split]  # [B, C, H, W]
    if edit is not None:
        current = edit(current)
        if split in capture:
            maps[split] = current
    b, c, h, w = current.shape
    if is_vit:
        tokens = torch.cat([prefix[split], current.flatten(2).transpose(1, 2)], dim=1)  # [B, P + H*W, C]
        for i in range(split + 1, n):
            tokens = model.blocks[i](tokens)
            if i in capture:
                prefix[i] = tokens[:, : model.num_prefix_tokens]
                maps[i] = token_map(model, tokens)
        features = model.norm(tokens)
    else:
        tokens = current.permute(0, 2, 3, 1)  # [B, H, W, C]
        for i in range(split + 1, n):
            tokens = model.layers[i](tokens)
            if i in capture:
                maps[i] = tokens.permute(0, 3, 1, 2)
        features = model.norm(tokens)
    return features, {i: maps[i] for i in capture}, prefix


def class_token_attention(model: nn.Module, tokens_in: torch.Tensor) -> torch.Tensor:
    """[B, H, W] attention of the class token to the patch tokens in a ViT's last block, averaged over heads.

    ``tokens_in`` [B, P + H*W, C] is the sequence that enters the last block (the output of the one before).
    """
    if not isinstance(model, VisionTransformer) or getattr(model, "cls_token", None) is None:
        raise ConfigError("attention='cls_attention' needs a ViT with a class token")
    block = model.blocks[-1]
    attn = block.attn
    b, n, c = tokens_in.shape
    qkv = attn.qkv(block.norm1(tokens_in)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, heads, N, d]
    scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, N]
    weights = scores.softmax(dim=-1)[:, :, 0, model.num_prefix_tokens :].mean(dim=1)  # [B, H*W]
    h, w = model.patch_embed.dynamic_feat_size(model.patch_embed.img_size)
    return weights.reshape(b, h, w)
