"""The training step, the epoch loop and validation.

The step never waits for the device: losses and correct counts are summed into device tensors (:class:`EpochTally`)
and read only every ``log_every`` steps (for the progress bar), when a checkpoint is written, and at the epoch end.
Dropout and drop-path draw from a generator re-seeded at every step from (seed, step, rank), so a run resumed at any
step continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_bench.models import FerModel
from fer_bench.runtime import DistContext, autocast, derive_seed
from fer_bench.train.losses import classification_loss


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class EpochTally:
    """An epoch's training sums, on the device: loss, correct predictions, images, and each loss term."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), dtype=_sum_dtype(device), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.seconds = 0.0  # training time of the epoch so far (carried over a resume)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, terms: dict[str, torch.Tensor]):
        n = len(labels)  # a host number: shapes are known without asking the device
        self.loss += loss.detach().to(self.loss.dtype) * n
        self.correct += (logits.detach().argmax(dim=1) == labels).sum()
        self.count += n
        for name, value in terms.items():
            if name not in self.terms:
                self.terms[name] = torch.zeros((), dtype=self.loss.dtype, device=self.device)
            self.terms[name] += value.detach().to(self.loss.dtype) * n
        self.steps += 1

    def state(self) -> dict[str, Any]:
        """For a mid-epoch checkpoint (reads the device)."""
        return {
            "loss": self.loss.cpu(),
            "correct": self.correct.cpu(),
            "count": self.count,
            "terms": {k: v.cpu() for k, v in self.terms.items()},
            "steps": self.steps,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> EpochTally:
        tally = cls(device)
        if state:
            tally.loss = state["loss"].to(device, tally.loss.dtype)
            tally.correct = state["correct"].to(device)
            tally.count, tally.steps, tally.seconds = int(state["count"]), int(state["steps"]), float(state["seconds"])
            tally.terms = {k: v.to(device, tally.loss.dtype) for k, v in state["terms"].items()}
        return tally

    def gathered(self, ctx: DistContext) -> EpochTally:
        """The sums over every rank's images (a collective under DDP: every rank calls it); itself in one process."""
        if not ctx.distributed:
            return self
        import torch.distributed as dist

        names = sorted(self.terms)
        values = torch.stack(
            [self.loss, self.correct.to(self.loss.dtype), torch.tensor(float(self.count), device=self.device)]
            + [self.terms[n] for n in names]
        )
        dist.all_reduce(values)
        total = EpochTally(self.device)
        total.loss, total.correct, total.count = values[0], values[1].to(torch.int64), int(values[2])
        total.terms = {n: values[3 + k] for k, n in enumerate(names)}
        total.steps, total.seconds = self.steps, self.seconds
        return total

    def row(self, ctx: DistContext) -> dict[str, float]:
        """``train_loss``, ``train_acc`` and (with heads) ``loss_<term>`` over every rank's images."""
        total = self.gathered(ctx)
        count = max(float(total.count), 1.0)
        row = {"train_loss": float(total.loss) / count, "train_acc": float(total.correct) / count}
        if len(total.terms) > 1:
            row |= {f"loss_{name}": float(total.terms[name]) / count for name in sorted(total.terms)}
        return row


def train_steps(
    model: FerModel,
    loader,
    *,
    forward_model: nn.Module | None = None,
    start_step: int,
    tally: EpochTally,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    label_smoothing: float,
    grad_clip: float | None,
    target_kind: str,
    class_weights: torch.Tensor | None,
    seed: int,
    rank: int,
    total_steps: int,
    max_steps: int | None,
    log_every: int,
    step_done: Callable[[float | None], None],
    after_step: Callable[[int], None] | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    ema: nn.Module | None = None,
) -> None:
    """Train on ``loader``'s batches of the current epoch from ``start_step`` on (or until ``max_steps`` optimiser
    steps were taken in all), adding each step to ``tally``.

    The loss is the classification loss plus every head's named terms (:meth:`FerModel.losses`). ``forward_model``
    is the module the training forward goes through (the DDP wrapper, or ``model``); the occlusion head's clean-image
    teacher runs on ``model`` itself, without gradients. ``step_done(loss)`` is called after every step with the
    loss every ``log_every`` steps (a host sync) and None otherwise; ``after_step(steps_done_in_epoch)`` after it
    (mid-epoch checkpoints). ``ema`` (timm's ``ModelEmaV3``) is updated after every optimiser step.
    """
    forward_model = forward_model or model
    model.train()
    needs_clean = model.head("occlusion") is not None
    started = time.perf_counter()
    for step, batch in enumerate(loader.iterate(start_step), start=start_step):
        global_step = scheduler.last_epoch
        if max_steps is not None and global_step >= max_steps:
            break
        # dropout and drop-path: a function of (seed, step, rank), not of what ran before a resume
        torch.manual_seed(derive_seed(seed, "step", global_step, rank))
        model.set_progress(global_step / max(1, total_steps))
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)  # [B, 3, S, S]
        labels = batch["label"].to(device, non_blocking=True)  # [B]
        target = batch.get("target")  # [B, K] soft targets
        occlusion_mask = batch.get("occlusion")  # [B, S, S]
        with autocast(device, amp_dtype):
            clean_outputs = None
            if needs_clean and "clean_image" in batch:
                with torch.no_grad():  # the teacher of the consistency term
                    clean = batch["clean_image"].to(device, memory_format=memory_format)
                    clean_outputs = model(clean, reconstruct=False)
            outputs = forward_model(images, occlusion_mask=occlusion_mask)
            logits = outputs["logits"]  # [B, K]
            terms = {
                "ce": classification_loss(
                    outputs.get("train_logits", logits),
                    labels=labels,
                    target=target,
                    target_kind=target_kind,
                    label_smoothing=label_smoothing,
                    class_weights=class_weights,
                )
            }
            terms |= model.losses(outputs, batch, clean_outputs)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:  # timm ModelEmaV3: a foreach lerp of every weight, no host sync
            ema.update(model, step=scheduler.last_epoch)
        tally.add(loss, logits, labels, terms)
        now = time.perf_counter()
        tally.seconds += now - started
        started = now
        step_done(float(loss.detach()) if (step + 1) % log_every == 0 else None)
        if after_step is not None:
            after_step(step + 1)


@torch.no_grad()
def validate(
    model: FerModel,
    loader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    num_classes: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """``val_loss`` and ``val_acc`` over every rank's share of the validation split, gathered with torchmetrics, so
    a distributed run reports exactly what one process would."""
    from torchmetrics import SumMetric
    from torchmetrics.classification import MulticlassAccuracy

    model.eval()
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    loss_sum, count = SumMetric().to(device), SumMetric().to(device)
    loss_sum.set_dtype(_sum_dtype(device))
    for batch in loader:
        images = batch["image"].to(device, memory_format=memory_format)
        labels = batch["label"].to(device)
        with autocast(device, amp_dtype):
            logits = model(images)["logits"].float()
        loss_sum.update(F.cross_entropy(logits, labels, reduction="sum"))
        count.update(torch.tensor(float(len(labels)), device=device))
        accuracy.update(logits, labels)
    n = float(count.compute())
    return {
        "val_loss": float(loss_sum.compute()) / max(n, 1.0),
        "val_acc": float(accuracy.compute()) if n else 0.0,
    }
