"""The order of training samples: one seeded order per epoch, shared by every rank, each rank taking a strided slice.

Both loaders (the device-resident one and the albumentations DataLoader) draw their batches from here, so a recipe
sees the same images in the same steps on 1 or N processes, and a run resumed in the middle of an epoch replays
exactly the batches it had not trained on yet.
"""

from __future__ import annotations

import numpy as np
import torch

from fer_bench.errors import ConfigError
from fer_bench.runtime import derive_seed

SAMPLERS: tuple[str, ...] = ("random", "class_balanced")


def epoch_order(
    num_items: int, *, seed: int, epoch: int, sampler: str = "random", labels: np.ndarray | None = None
) -> np.ndarray:
    """The epoch's order of item indices (int64 [num_items]), a pure function of (``seed``, ``epoch``).

    ``random`` is a permutation; ``class_balanced`` draws ``num_items`` indices with replacement, each class equally
    likely (AffectNet's usual fix for its imbalanced training set).

    Example:
        >>> a = epoch_order(5, seed=0, epoch=1)
        >>> sorted(a.tolist()), bool((a == epoch_order(5, seed=0, epoch=1)).all())
        ([0, 1, 2, 3, 4], True)
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    if sampler == "random":
        return torch.randperm(num_items, generator=generator).numpy()
    if labels is None or len(labels) != num_items:
        raise ConfigError("data.sampler=class_balanced needs one label per training item")
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return torch.multinomial(weights, num_items, replacement=True, generator=generator).numpy()


def steps_per_epoch(num_items: int, global_batch: int) -> int:
    """Full global batches in an epoch (the ragged last batch is dropped: static shapes for compile and DDP)."""
    return num_items // global_batch


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each process's share of the recipe's (global) batch.

    Raises:
        ConfigError: the global batch does not divide evenly among the processes.
    """
    if global_batch % world_size:
        raise ConfigError(
            f"optim.batch_size={global_batch} is the global batch and must divide evenly among the {world_size} "
            f"processes (e.g. {global_batch - global_batch % world_size or world_size})"
        )
    return global_batch // world_size


def rank_batch(order, *, step: int, global_batch: int, rank: int, world_size: int):
    """Rank ``rank``'s items of global batch ``step``: positions ``step·G + rank``, ``+ world_size``, ... of ``order``
    (a NumPy array or a torch tensor, on any device: a slice, so no copy between host and device).

    The union over ranks is exactly the global batch, so the gradient DDP averages is the one-process gradient.

    Example:
        >>> order = np.arange(8)
        >>> rank_batch(order, step=1, global_batch=4, rank=0, world_size=2).tolist()
        [4, 6]
    """
    start = step * global_batch
    return order[start + rank : start + global_batch : world_size]
