"""``occlusion``: detect occluded patches, mask them, reconstruct the face, classify — after Latent-OFER (Lee, Lee,
Yoo, ICCV 2023), on the backbone's own tokens.

Chain (train and test alike), at layer ``layer`` of the backbone (ViT block / Swin stage):

1. **Detect**: a per-token detector scores each token of the layer's [B, C, H, W] map as occluded.
   ``detector: supervised`` (default) is a small MLP trained with binary cross-entropy against the patch occupancy
   (the fraction of the patch's pixels under the known occlusion mask); ``detector: one_class`` needs no masks: it
   keeps running per-position mean and variance of tokens of clean images and flags a token whose mean squared
   standardised distance exceeds the ``quantile`` of recent clean scores (a Mahalanobis-style one-class model,
   the simpler variant of the paper's ViT-SVDD).
2. **Mask**: flagged tokens are replaced by a learned mask token; the remaining layers run on the edited map. While
   training with known masks the true occupancy (≥ ``min_occupancy``) chooses the tokens (teacher forcing; set
   ``teacher_forcing: false`` to use the detector's flags throughout).
3. **Reconstruct**: a light MAE-style decoder (linear embedding, learned positions, ``decoder_depth`` transformer
   blocks of width ``decoder_dim``, a linear map to pixels) turns the final token map back into the image; L1 on the
   pixels of the masked patches only, against the clean image (normalised pixels).
4. **Classify**: the backbone's own classifier on the result. A consistency term KL(p_clean ‖ p_occluded), the
   clean prediction detached as the teacher, sends gradient through the occluded branch into the backbone (in the
   released Latent-OFER code the semantic term never reaches the generator).

Loss terms: ``occ_detect`` (``detect_weight`` · BCE), ``occ_recon`` (``recon_weight`` · L1), ``occ_consistency``
(``consistency_weight`` · KL). Training draws synthetic occluders on clean images (``augment``: probability,
``occluders``: kinds; see :mod:`fer_bench.data.occluders`), keeping the clean image for the last two terms.

The supervised detector's training step never waits on the device; the one-class detector's statistics update
reads it (its quantile threshold over a memory of clean scores), one host sync per step.

Options (recipe ``model.heads.occlusion``): ``layer`` (default: the middle, n // 2 − 1), ``detector``, ``threshold``
(0.5, on the detector's probability), ``min_occupancy`` (0.25), ``quantile`` (0.99), ``teacher_forcing`` (true),
``decoder_dim`` (128), ``decoder_depth`` (1), ``detect_weight`` (1.0), ``recon_weight`` (1.0),
``consistency_weight`` (1.0), ``augment`` (0.5), ``occluders`` ([object, hand, bar, patch]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from fer_bench.errors import ConfigError
from fer_bench.models.heads._base import HeadContext, check_range
from fer_bench.runtime import global_mean

DETECTORS: tuple[str, ...] = ("supervised", "one_class")
_SCORE_MEMORY = 4096


def patch_occupancy(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch's pixels that are occluded: pixel mask [B, S, S] → [B, H, W] in [0, 1].

    Example:
        >>> m = torch.zeros(1, 4, 4); m[0, :2, :1] = 1
        >>> patch_occupancy(m, (2, 2)).tolist()
        [[[0.5, 0.0], [0.0, 0.0]]]
    """
    return F.adaptive_avg_pool2d(mask.float().unsqueeze(1), grid).squeeze(1)


def substitute_tokens(tokens: torch.Tensor, flags: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace the flagged tokens of a [B, C, H, W] map by ``mask_token`` [C]; flags [B, H, W] bool.

    Example:
        >>> t = torch.ones(1, 2, 1, 2); f = torch.tensor([[[True, False]]])
        >>> substitute_tokens(t, f, torch.tensor([5.0, 6.0]))[0, :, 0].tolist()
        [[5.0, 1.0], [6.0, 1.0]]
    """
    return torch.where(flags.unsqueeze(1), mask_token.view(1, -1, 1, 1).to(tokens.dtype), tokens)


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Mean |reconstruction − target| over the pixels where ``pixel_mask`` [B, S, S] is set (all channels); 0 if none.

    Example:
        >>> r, t = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2); m = torch.zeros(1, 2, 2); m[0, 0, 0] = 1
        >>> t[0, :, 1, 1] = 9.0  # outside the mask: ignored
        >>> float(masked_l1(r, t, m))
        1.0
    """
    weight = pixel_mask.float().unsqueeze(1).expand_as(target)
    return global_mean(((reconstruction - target).abs() * weight).sum(), weight.sum())  # no host sync


class _Decoder(nn.Module):
    """MAE-style light decoder: final token map [B, C, H, W] → image [B, 3, S, S]."""

    def __init__(self, in_dim: int, grid: tuple[int, int], img_size: int, width: int, depth: int) -> None:
        super().__init__()
        self.grid, self.img_size = grid, img_size
        self.patch = (img_size // grid[0], img_size // grid[1])
        self.embed = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, num_heads=max(1, width // 32)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, 3 * self.patch[0] * self.patch[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, h, w = tokens.shape
        x = self.embed(tokens.flatten(2).transpose(1, 2)) + self.pos  # [B, H*W, width]
        x = self.to_pixels(self.norm(self.blocks(x)))  # [B, H*W, 3*ph*pw]
        ph, pw = self.patch
        x = x.reshape(b, h, w, 3, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * ph, w * pw)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return x


class OcclusionHead(nn.Module):
    name = "occlusion"

    def __init__(
        self,
        context: HeadContext,
        *,
        layer: int | None = None,
        detector: str = "supervised",
        threshold: float = 0.5,
        min_occupancy: float = 0.25,
        quantile: float = 0.99,
        teacher_forcing: bool = True,
        decoder_dim: int = 128,
        decoder_depth: int = 1,
        detect_weight: float = 1.0,
        recon_weight: float = 1.0,
        consistency_weight: float = 1.0,
        augment: float = 0.5,
        occluders: list[str] | tuple[str, ...] = ("object", "hand", "bar", "patch"),
    ) -> None:
        super().__init__()
        opt = "model.heads.occlusion."
        if detector not in DETECTORS:
            raise ConfigError(f"{opt}detector: expected one of {list(DETECTORS)}, got {detector!r}")
        if not isinstance(decoder_dim, int) or decoder_dim < 8:
            raise ConfigError(f"{opt}decoder_dim: expected an integer >= 8, got {decoder_dim!r}")
        if not isinstance(decoder_depth, int) or decoder_depth < 0:
            raise ConfigError(f"{opt}decoder_depth: expected an integer >= 0, got {decoder_depth!r}")
        middle = max(0, context.num_layers // 2 - 1)
        self.layer = context.layer(middle if layer is None else layer, option=opt + "layer")
        if self.layer == context.num_layers - 1:
            raise ConfigError(f"{opt}layer={layer}: the mask token needs at least one layer after it; use <= -2")
        self.detector_kind = detector
        # The one-class detector never trains the supervised MLP: DDP must be told those weights get no gradient.
        self.unused_parameters = detector == "one_class"
        self.threshold = check_range(opt + "threshold", threshold, 0.0, 1.0)
        self.min_occupancy = check_range(opt + "min_occupancy", min_occupancy, 0.0, 1.0)
        self.quantile = check_range(opt + "quantile", quantile, 0.5, 1.0)
        self.teacher_forcing = bool(teacher_forcing)
        self.detect_weight = check_range(opt + "detect_weight", detect_weight, 0.0)
        self.recon_weight = check_range(opt + "recon_weight", recon_weight, 0.0)
        self.consistency_weight = check_range(opt + "consistency_weight", consistency_weight, 0.0)
        self.augment = check_range(opt + "augment", augment, 0.0, 1.0)
        self.occluders = tuple(occluders)  # checked by the data side (fer_bench.data.occluders), which draws them
        dim, grid = context.layer_dims[self.layer], context.layer_grids[self.layer]
        self.grid = grid
        self.detector = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = _Decoder(
            context.layer_dims[-1], context.layer_grids[-1], context.img_size, decoder_dim, decoder_depth
        )
        # One-class statistics per position (EMA) and a memory of recent clean scores for the threshold.
        self.register_buffer("clean_mean", torch.zeros(dim, *grid))
        self.register_buffer("clean_var", torch.ones(dim, *grid))
        self.register_buffer("clean_seen", torch.zeros(()))
        self.register_buffer("score_memory", torch.zeros(_SCORE_MEMORY))
        self.register_buffer("score_threshold", torch.tensor(float("inf")))

    def config(self) -> dict:
        return {
            "layer": self.layer,
            "detector": self.detector_kind,
            "threshold": self.threshold,
            "min_occupancy": self.min_occupancy,
            "grid": list(self.grid),
        }

    def one_class_score(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H, W] mean squared standardised distance of each token to the clean statistics at its position."""
        z = (tokens.float() - self.clean_mean) ** 2 / (self.clean_var + 1e-5)
        return z.mean(dim=1)

    @torch.no_grad()
    def update_clean_statistics(self, tokens: torch.Tensor) -> None:
        """Fold a batch of clean-image tokens [B, C, H, W] into the one-class model (EMA, then the threshold)."""
        tokens = tokens.detach().float()
        momentum = 1.0 if float(self.clean_seen) == 0 else 0.05
        self.clean_mean.lerp_(tokens.mean(dim=0), momentum)
        self.clean_var.lerp_(tokens.var(dim=0, unbiased=False) + 1e-4, momentum)
        self.clean_seen += len(tokens)
        scores = self.one_class_score(tokens).flatten()
        self.score_memory.copy_(torch.cat([scores, self.score_memory])[: len(self.score_memory)])
        filled = self.score_memory[: int(min(float(self.clean_seen) * scores.numel() / len(tokens), _SCORE_MEMORY))]
        self.score_threshold.fill_(torch.quantile(filled, self.quantile).item())

    def detect(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score [B, H, W], flags [B, H, W] bool): detector probability (supervised) or one-class distance."""
        if self.detector_kind == "supervised":
            logits = self.detector(tokens.permute(0, 2, 3, 1)).squeeze(-1)  # [B, H, W]
            return logits, torch.sigmoid(logits) > self.threshold
        score = self.one_class_score(tokens)
        return score, score > self.score_threshold

    def edit(self, tokens: torch.Tensor, state: dict, occlusion_mask: torch.Tensor | None) -> torch.Tensor:
        """Detect and mask on the layer's token map; records scores, flags and occupancy in ``state``."""
        occupancy = None
        if occlusion_mask is not None:
            occupancy = patch_occupancy(occlusion_mask.to(tokens.device), tokens.shape[-2:])
        if self.training and self.detector_kind == "one_class":
            clean = occupancy.flatten(1).amax(dim=1) == 0 if occupancy is not None else slice(None)
            if tokens[clean].numel():
                self.update_clean_statistics(tokens[clean])
        score, flags = self.detect(tokens)
        state["occlusion_score"], state["occlusion_flags"] = score, flags
        if occupancy is not None:
            state["occlusion_occupancy"] = occupancy
            if self.training and self.teacher_forcing:
                flags = occupancy >= self.min_occupancy
        state["occlusion_masked"] = flags
        if self.detector_kind == "one_class" and not self.training and float(self.clean_seen) == 0:
            return tokens  # never fitted: flag nothing rather than everything
        return substitute_tokens(tokens, flags, self.mask_token)

    def losses(
        self,
        outputs: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        clean_outputs: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        device = outputs["logits"].device
        out: dict[str, torch.Tensor] = {}
        if self.detector_kind == "supervised" and "occlusion_occupancy" in outputs:
            out["occ_detect"] = self.detect_weight * F.binary_cross_entropy_with_logits(
                outputs["occlusion_score"].float(), outputs["occlusion_occupancy"].float()
            )
        has_clean = batch.get("has_clean")
        if "reconstruction" in outputs and "clean_image" in batch and has_clean is not None:
            keep = has_clean.to(device)
            masked = outputs["occlusion_masked"] & keep.view(-1, 1, 1)  # [B, H, W]
            size = outputs["reconstruction"].shape[-1]
            pixel_mask = F.interpolate(masked.float().unsqueeze(1), size=(size, size), mode="nearest").squeeze(1)
            clean = batch["clean_image"].to(device)
            reconstruction = outputs["reconstruction"].float()
            out["occ_recon"] = self.recon_weight * masked_l1(reconstruction, clean.float(), pixel_mask)
            if clean_outputs is not None:
                occupancy = outputs.get("occlusion_occupancy", masked.float())
                occluded = keep & (masked.flatten(1).any(dim=1) | (occupancy.flatten(1).amax(dim=1) > 0))
                teacher = torch.softmax(clean_outputs["logits"].detach().float(), dim=1)
                student = torch.log_softmax(outputs["logits"].float(), dim=1)
                per_sample = F.kl_div(student, teacher, reduction="none").sum(dim=1)  # [B]
                # the mean over occluded samples, by weights: no host sync, and 0 when none is occluded
                weight = occluded.float()
                kl = global_mean((per_sample * weight).sum(), weight.sum())
                out["occ_consistency"] = self.consistency_weight * kl
        return out
