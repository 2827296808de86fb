"""Training losses for hard labels and for the soft targets some datasets provide (FERPlus votes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fer_bench.runtime import global_mean

MULTI_TARGET_EPSILON = 0.001


def classification_loss(
    logits: torch.Tensor,
    *,
    labels: torch.Tensor,
    target: torch.Tensor | None = None,
    target_kind: str = "label",
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of a batch.

    * ``label``: cross-entropy on ``labels`` [B] (with label smoothing and optional per-class ``class_weights`` [K]).
      ``logits`` may also be log-probabilities (the anchors head's balanced distribution): log_softmax leaves them.
    * ``soft`` / ``sample``: cross-entropy -Σ_k t_k log p_k on ``target`` [B, K] (a distribution or a drawn one-hot).
    * ``multi_target``: -log max_k(t'_k p_k) with t' = (1-ε)·[t > 0] + ε, ε = 0.001 (Barsoum et al., 2016; the
      official FER+ trainer): any class the annotators chose counts as right.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]])
        >>> a = classification_loss(logits, labels=torch.tensor([0]))
        >>> b = classification_loss(logits, labels=torch.tensor([0]), target=torch.tensor([[1.0, 0.0]]),
        ...                         target_kind="soft")
        >>> bool(torch.isclose(a, b))
        True
    """
    logits = logits.float()  # [B, K]
    if target_kind == "label":
        if class_weights is None:
            return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        weight = class_weights.to(logits.device).float()
        per_sample = F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing, reduction="none")
        # the weighted mean divides by the batch's summed weights: over every rank's batch under DDP
        return global_mean(per_sample.sum(), weight[labels].sum())
    if target is None:
        raise ValueError(f"target_kind={target_kind!r} needs the batch's 'target'")
    if target_kind in ("soft", "sample"):
        return F.cross_entropy(logits, target.float(), label_smoothing=label_smoothing)
    if target_kind == "multi_target":
        mask = (target > 0).float()
        weights = (1 - MULTI_TARGET_EPSILON) * mask + MULTI_TARGET_EPSILON  # [B, K]
        best = (weights * logits.softmax(dim=1)).max(dim=1).values  # [B]
        return -torch.log(best.clamp_min(1e-12)).mean()
    raise ValueError(f"unknown target_kind {target_kind!r}")
