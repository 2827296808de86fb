"""``anchors``: anchor-based reliability balancing of the predicted label distribution (ARBEx, Wasi et al. 2023,
extended as GReFEL 2024), for noisy and imbalanced labels.

K learnable anchors per class live in the embedding space (optionally after a linear reduction). With p = softmax of
the classifier, d_{k,j} = ‖e − a_{k,j}‖₂ and s = softmax over all C·K anchors of (−d/δ):

* anchor distribution g_k = Σ_j s_{k,j};
* confidence c(q) = 1 − H(q) / log C (1 for a one-hot q, 0 for the uniform one);
* corrected p̂ = c(p)·p + (1 − c(p))·g — where the classifier is unsure, trust the geometry of the embedding;
* trained distribution p_final = (1 − τ)·p + τ·p̂, the trust τ ramping linearly from 0 (end of warm-up) to 1.

The confidence that mixes p̂ is a constant gate (``detach_confidence``, default true; ARBEx's code lets gradient
through it): otherwise the cheapest way to lower the loss on a sample whose anchor distribution beats the classifier
is to make p *flatter* (lower c(p) hands the sample to g), and the classifier — which makes the test-time
prediction — unlearns. ``benchmarks/results/heads_ablation_followup.md`` measures both.

Losses: cross-entropy on p_final (``class_weighted``: weights N / (C·n_k), as ARBEx), plus τ·(``center_weight`` ·
L_center + ``separation_weight`` · L_sep) with L_center = mean_i c(p_i)·min_j d(e_i, a_{y_i,j}) / √D (confidence
detached, so the model cannot lower it to shrink the loss) and the bounded separation
L_sep = mean over class pairs of relu(margin − min distance between their anchors / √D) ∈ [0, margin] — instead of
ARBEx's −Σ‖A_k − A_k'‖², which is unbounded below.

Anchors start as the class means of the embeddings seen during the warm-up (plus a little noise when K > 1; a class
absent from the warm-up starts at the overall mean); before that the head only accumulates those means and
p_final = p.

``mode: arbex`` reproduces the released ARBEx head for comparison: zero-initialised anchors used from step 0, the
batch-attention correction (Q/K/V maps to C·K_a, one-head attention across the samples of the mini-batch, softmax
summed per class → α; corrections (c(g)·g + c(α)·α)/(c(g) + c(α))), the unbounded anchor loss, class-weighted NLL
and a non-detached confidence in the centre loss.

At test time the prediction is p (ARBEx's default) unless ``test_correction: true``, which predicts
c(p)·p + (1 − c(p))·g. Evaluation reports record which.

Options (recipe ``model.heads.anchors``): ``anchors_per_class`` (K, 1), ``dim`` (reduction width, null = none),
``delta`` (δ, 1.0), ``warmup`` (fraction of training before anchors are initialised, 0.1), ``center_weight`` (1.0),
``separation_weight`` (1.0), ``margin`` (1.0), ``class_weighted`` (false), ``test_correction`` (false),
``mode`` (``fer_bench`` | ``arbex``), ``detach_confidence`` (null: true, false in ``arbex`` mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fer_bench.errors import ConfigError
from fer_bench.models.heads._base import HeadContext, check_range

MODES: tuple[str, ...] = ("fer_bench", "arbex")


def confidence(q: torch.Tensor) -> torch.Tensor:
    """c(q) = 1 − H(q) / log C for distributions q [..., C].

    Example:
        >>> [round(v, 4) for v in confidence(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist()]
        [1.0, 0.0]
    """
    entropy = -(q * torch.log(q.clamp_min(1e-12))).sum(dim=-1)
    return 1 - entropy / math.log(q.shape[-1])


def anchor_distribution(distances: torch.Tensor, delta: float) -> torch.Tensor:
    """g [B, C] from anchor distances [B, C, K]: softmax over all C·K anchors of −d/δ, summed per class.

    Example:
        >>> g = anchor_distribution(torch.tensor([[[0.0], [math.log(3.0)]]]), 1.0)
        >>> [round(v, 4) for v in g[0].tolist()]
        [0.75, 0.25]
    """
    b, c, k = distances.shape
    return torch.softmax(-distances.reshape(b, c * k) / delta, dim=1).reshape(b, c, k).sum(dim=2)


def corrected_distribution(
    p: torch.Tensor, correction: torch.Tensor, *, detach_confidence: bool = False
) -> torch.Tensor:
    """p̂ = c(p)·p + (1 − c(p))·correction, row-wise; with ``detach_confidence`` c(p) is a constant gate (no gradient).

    Example:
        >>> p = torch.tensor([[0.5, 0.5]]); g = torch.tensor([[0.9, 0.1]])
        >>> corrected_distribution(p, g).tolist()  # c(p) = 0: all correction
        [[0.8999999761581421, 0.10000000149011612]]
    """
    c = confidence(p).unsqueeze(-1)
    c = c.detach() if detach_confidence else c
    return c * p + (1 - c) * correction


def separation_loss(anchors: torch.Tensor, margin: float) -> torch.Tensor:
    """Bounded anchor separation: mean over class pairs k < k' of relu(margin − min_{j,j'} ‖a_kj − a_k'j'‖ / √D).

    anchors [C, K, D]. 0 once every pair of classes is ``margin`` apart; never above ``margin``.

    Example:
        >>> a = torch.zeros(2, 1, 4); a[1, 0] = 2.0  # distance 4, / sqrt(4) = 2
        >>> float(separation_loss(a, 1.0)), float(separation_loss(a, 3.0)), float(separation_loss(a * 0, 1.0))
        (0.0, 1.0, 1.0)
    """
    c, k, d = anchors.shape
    flat = anchors.reshape(c * k, d)
    dist = torch.cdist(flat, flat).reshape(c, k, c, k).amin(dim=(1, 3)) / math.sqrt(d)  # [C, C]
    pairs = torch.triu_indices(c, c, offset=1, device=anchors.device)
    return F.relu(margin - dist[pairs[0], pairs[1]]).mean()


class _BatchAttention(nn.Module):
    """ARBEx's correction branch: every sample attends over the other samples of the mini-batch."""

    def __init__(self, dim: int, num_classes: int, anchors_per_class: int = 1) -> None:
        super().__init__()
        width = num_classes * anchors_per_class
        self.q, self.k, self.v = nn.Linear(dim, width), nn.Linear(dim, width), nn.Linear(dim, width)
        self.attn = nn.MultiheadAttention(width, num_heads=1)
        self.num_classes = num_classes

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # e: [B, D] -> alpha [B, C]
        out, _ = self.attn(self.q(e), self.k(e), self.v(e), need_weights=False)  # unbatched: the batch is the sequence
        return torch.softmax(out, dim=1).reshape(len(e), self.num_classes, -1).sum(dim=2)


class AnchorHead(nn.Module):
    name = "anchors"
    rank_local_sums = ("mean_sums", "mean_counts")  # each DDP rank sums its own samples until the anchors start

    def __init__(
        self,
        context: HeadContext,
        *,
        anchors_per_class: int = 1,
        dim: int | None = None,
        delta: float = 1.0,
        warmup: float = 0.1,
        center_weight: float = 1.0,
        separation_weight: float = 1.0,
        margin: float = 1.0,
        class_weighted: bool = False,
        test_correction: bool = False,
        mode: str = "fer_bench",
        detach_confidence: bool | None = None,
    ) -> None:
        super().__init__()
        opt = "model.heads.anchors."
        if mode not in MODES:
            raise ConfigError(f"{opt}mode: expected one of {list(MODES)}, got {mode!r}")
        if not isinstance(anchors_per_class, int) or anchors_per_class < 1:
            raise ConfigError(f"{opt}anchors_per_class: expected a positive integer, got {anchors_per_class!r}")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ConfigError(f"{opt}dim: expected a positive integer or null, got {dim!r}")
        self.mode = mode
        self.k = anchors_per_class
        self.delta = check_range(opt + "delta", delta, 1e-6)
        self.warmup = 0.0 if mode == "arbex" else check_range(opt + "warmup", warmup, 0.0, 0.9)
        self.center_weight = check_range(opt + "center_weight", center_weight, 0.0)
        self.separation_weight = check_range(opt + "separation_weight", separation_weight, 0.0)
        self.margin = check_range(opt + "margin", margin, 0.0)
        self.class_weighted = bool(class_weighted) or mode == "arbex"
        self.test_correction = bool(test_correction)
        self.detach_confidence = (mode != "arbex") if detach_confidence is None else bool(detach_confidence)
        self.num_classes = context.num_classes
        self.reduce = nn.Linear(context.embed_dim, dim) if dim else nn.Identity()
        self.dim = dim or context.embed_dim
        self.anchors = nn.Parameter(torch.zeros(self.num_classes, self.k, self.dim))  # [C, K, D]
        self.attention = _BatchAttention(self.dim, self.num_classes) if mode == "arbex" else None
        # Training state, saved with the weights: progress in [0, 1], class-mean sums during warm-up, class weights.
        self.register_buffer("progress", torch.zeros(()))
        self.register_buffer("initialised", torch.tensor(mode == "arbex"))
        self.register_buffer("mean_sums", torch.zeros(self.num_classes, self.dim))
        self.register_buffer("mean_counts", torch.zeros(self.num_classes))
        self.register_buffer("class_weights", torch.ones(self.num_classes))
        # Host-side copies of progress and initialised: the step reads them every time, and reading a buffer on a
        # GPU would wait for the device (a host sync). Refreshed from the buffers when a checkpoint is loaded.
        self._progress, self._initialised = 0.0, mode == "arbex"
        self.register_load_state_dict_post_hook(AnchorHead._refresh_host_state)

    @staticmethod
    def _refresh_host_state(module: AnchorHead, incompatible_keys) -> None:
        module._progress = float(module.progress)
        module._initialised = bool(module.initialised)

    def config(self) -> dict:
        return {
            "mode": self.mode,
            "anchors_per_class": self.k,
            "dim": self.dim,
            "delta": self.delta,
            "test_correction": self.test_correction,
            "detach_confidence": self.detach_confidence,
        }

    @property
    def trust(self) -> float:
        """τ: 0 until the anchors are initialised, then a linear ramp to 1 over the rest of training."""
        if not self._initialised:
            return 0.0
        return float(min(1.0, max(0.0, (self._progress - self.warmup) / max(1e-6, 1 - self.warmup))))

    def set_progress(self, fraction: float) -> None:
        """Called by the training loop before each step (fraction of all steps done); initialises the anchors from
        the accumulated class means once the warm-up is over. Every rank of a distributed run calls it at the same
        step, so the class means are summed over all ranks first and every rank starts from the same anchors."""
        self._progress = float(fraction)
        self.progress.fill_(fraction)
        if self._initialised or fraction < self.warmup:
            return
        sums, counts = self.mean_sums.clone(), self.mean_counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        seen = counts > 0
        if not bool(seen.any()):  # nothing accumulated yet (one host sync, only until the anchors start)
            return
        means = sums / counts.clamp_min(1).unsqueeze(1)  # [C, D]
        # A class absent from the warm-up starts at the mean of all embeddings (the separation term moves it).
        overall = sums[seen].sum(dim=0) / counts[seen].sum()
        means = torch.where(seen.unsqueeze(1), means, overall)
        spread = means.std() * 0.05 if self.k > 1 or not bool(seen.all()) else 0.0
        with torch.no_grad():
            self.anchors.copy_(means.unsqueeze(1) + spread * torch.randn_like(self.anchors))
        self.initialised.fill_(True)
        self._initialised = True

    def set_class_weights(self, counts: torch.Tensor) -> None:
        """Inverse-frequency weights N / (C·n_k) from the training split's class counts."""
        counts = counts.float().clamp_min(1)
        self.class_weights.copy_(counts.sum() / (len(counts) * counts))

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        # Distances, softmaxes and the class-mean buffers stay fp32 under bf16/fp16 autocast: the anchors' geometry
        # is what this head is about, and index_add_ into the fp32 buffers needs fp32 embeddings.
        with torch.autocast(embedding.device.type, enabled=False):
            return self._forward(embedding.float(), logits.float())

    def _forward(self, embedding: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.reduce(embedding)  # [B, D']
        distances = torch.cdist(e.unsqueeze(1), self.anchors.reshape(1, -1, self.dim)).reshape(
            len(e), self.num_classes, self.k
        )  # [B, C, K]
        p = torch.softmax(logits.float(), dim=1)  # [B, C]
        g = anchor_distribution(distances, self.delta)
        correction = g
        if self.attention is not None and len(e) > 1:
            alpha = self.attention(e)
            cg, ca = confidence(g).unsqueeze(1), confidence(alpha).unsqueeze(1)
            correction = (cg * g + ca * alpha) / (cg + ca).clamp_min(1e-6)
        tau = self.trust if self.training else 1.0
        final = (1 - tau) * p + tau * corrected_distribution(p, correction, detach_confidence=self.detach_confidence)
        out = {"anchor_embedding": e, "anchor_distances": distances, "anchor_distribution": g, "probs": p}
        if self.training:
            out["train_logits"] = torch.log(final.clamp_min(1e-12))
        elif self.test_correction:
            out["logits"] = torch.log(corrected_distribution(p, g).clamp_min(1e-12))
        return out

    def losses(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        e, distances, p = outputs["anchor_embedding"], outputs["anchor_distances"], outputs["probs"]
        labels = batch["label"].to(e.device)
        if not self._initialised:  # warm-up: accumulate the class means the anchors will start from
            with torch.no_grad():
                self.mean_sums.index_add_(0, labels, e.detach().float())
                self.mean_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
            zero = self.anchors.sum() * 0.0
            return {"anchor_center": zero, "anchor_separation": zero}
        tau = self.trust
        c = confidence(p) if self.mode == "arbex" else confidence(p).detach()
        nearest = distances[torch.arange(len(e), device=e.device), labels].amin(dim=1)  # [B]
        center = (c * nearest).mean() / math.sqrt(self.dim)
        if self.mode == "arbex":
            flat = self.anchors.reshape(self.num_classes, -1)
            separation = -torch.cdist(flat, flat).pow(2).sum() / (math.sqrt(self.dim) * self.k**2)
        else:
            separation = separation_loss(self.anchors, self.margin)
        return {
            "anchor_center": tau * self.center_weight * center,
            "anchor_separation": tau * self.separation_weight * separation,
        }
