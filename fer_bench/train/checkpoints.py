"""A run folder's checkpoint set: ``last.pt`` (everything needed to continue, to the step) and ``best.pt`` (the best
weights so far), kept consistent whatever moment the process is killed at.

Each file is written atomically (a temp file, then a rename), so either file is whole. The two are written one after
the other, so a kill can fall between them: ``last.pt`` then records a best step that ``best.pt`` does not hold yet.
``last.pt`` therefore carries the best weights' step, and :func:`check_best` compares it with ``best.pt`` on resume
and before the final evaluation; when ``last.pt`` itself holds the best weights (the kill came right after it), it
rewrites ``best.pt`` from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fer_bench.errors import CheckpointError
from fer_bench.models.checkpoint import load_checkpoint, save_checkpoint

LAST, BEST = "last.pt", "best.pt"
_BEST_KEYS = ("recipe", "model_config", "label_names", "face_framing", "dataset", "mlflow_run_id", "fer_bench_version")


def clean_partial_writes(folder: Path) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files that atomic writes leave when the process is killed mid-write."""
    removed = []
    for path in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def best_state(state: dict[str, Any]) -> dict[str, Any]:
    """What ``best.pt`` holds: the weights and what evaluating them needs (no optimiser: half the bytes)."""
    best = state["best"]
    return {
        "model": state["ema"] if state.get("ema") is not None else state["model"],  # the weights that were validated
        **{key: state[key] for key in _BEST_KEYS if key in state},
        "epoch": best["epoch"],
        "global_step": best["global_step"],
        "val_acc": best["val_acc"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
    }


def save_epoch_end(folder: Path, state: dict[str, Any], *, improved: bool) -> None:
    """Write ``last.pt``, then (when this epoch is the best so far) ``best.pt``; see the module notes for why the
    order and :func:`check_best` make every kill point recoverable."""
    save_checkpoint(folder / LAST, state)
    if improved:
        save_checkpoint(folder / BEST, best_state(state))


def check_best(folder: Path, last: dict[str, Any], message: Callable[[str], None]) -> None:
    """Make ``best.pt`` hold the weights ``last.pt`` says are the best, or raise.

    Raises:
        CheckpointError: ``best.pt`` is missing or stale and ``last.pt`` cannot restore it.
    """
    best_info = last.get("best")
    if not best_info or best_info.get("global_step") is None or best_info["epoch"] < 0:
        return  # nothing validated yet (or a checkpoint written before the best step was recorded)
    path = folder / BEST
    held = None
    if path.is_file():
        try:
            held = load_checkpoint(path).get("global_step")
        except CheckpointError:
            held = "unreadable"
    if held == best_info["global_step"]:
        return
    if best_info["global_step"] == last.get("global_step"):
        save_checkpoint(path, best_state(last))
        found = "missing" if held is None else f"from step {held}"
        message(
            f"{path}: was {found}, but {folder / LAST} records the best weights at step {best_info['global_step']} "
            f"(epoch {best_info['epoch'] + 1}), which it holds itself: best.pt rewritten from it"
        )
        return
    raise CheckpointError(
        f"{path}: holds step {held}, but {folder / LAST} records the best weights at step "
        f"{best_info['global_step']} and cannot restore them; evaluate last.pt instead, or retrain"
    )
