"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` so a pickled object is refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fer_bench._io import atomic_path
from fer_bench.errors import CheckpointError

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts only) to ``path`` via a temp file and a rename."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fer_bench checkpoint safely.

    Raises:
        CheckpointError: missing file, a file that needs unpickling of arbitrary objects, or not a fer_bench one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(
            f"{path}: refused — it holds objects that only a full unpickle could load ({first[:160]}); "
            "fer_bench loads weights-only checkpoints"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise CheckpointError(f"{path}: not a fer_bench checkpoint (expected keys 'model' and 'recipe')")
    return state


def model_from_checkpoint(state: dict[str, Any]):
    """Rebuild the FerModel stored in a checkpoint (its ``model_config`` and weights); returns (model, state)."""
    from fer_bench.models.fer_model import create_model

    config = state.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError("checkpoint has no 'model_config'; it was not written by ferbench train")
    model = create_model(
        config["backbone"],
        num_classes=int(config["num_classes"]),
        img_size=int(config["img_size"]),
        pretrained=False,
        stem=config.get("stem", "patch"),
        heads=config.get("heads") or {},
        **config.get("backbone_kwargs", {}),
    )
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model
