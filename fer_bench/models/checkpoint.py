"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` so a pickled object is refused."""

from __future__ import annotations

import os
import pickle
import warnings
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
    if path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: is a folder; give the .pt file (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():
            # A file that is a bare pickle (not torch's zip format) makes the weights-only unpickler warn that its
            # protocol is not torch's default; the load then succeeds or fails into a CheckpointError naming the
            # file, so the warning would only precede that one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # torch's weights-only unpickler names the object it refused ("Unsupported global: GLOBAL builtins.print",
        # or "Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked" for os, subprocess...);
        # anything else (an invalid load key) means the bytes are not a pickle at all
        refused = next((line.strip() for line in text.splitlines() if "unsupported global" in line.lower()), None)
        if refused:
            raise CheckpointError(
                f"{path}: refused — it holds objects that only a full unpickle could load ({refused[:160]}); "
                "fer_bench loads weights-only checkpoints"
            ) from None
        after = text.split("WeightsUnpickler error:", 1)[-1]  # what the unpickler found, without torch's advice
        lines = [line.strip() for line in after.splitlines() if line.strip() and "torch.load" not in line]
        reason = _first_sentence(lines[0]) if lines else "not a pickle"
        if any(s in reason for s in ("Unsupported operand", "invalid load key", "not a pickle")):
            reason = "not a torch.save file: random bytes, or another format"
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    except Exception:  # the unpickler on arbitrary bytes raises KeyError, IndexError, ...: still not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save file)") from None
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise CheckpointError(f"{path}: not a fer_bench checkpoint (expected keys 'model' and 'recipe')")
    return state


def fer_bench_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state of ``path`` when it is a fer_bench checkpoint (``best.pt``/``last.pt`` as ``fit`` writes them), else
    None (a timm/torch weights file, or anything unreadable: its own loader reports that).

    Read weights-only and memory-mapped where torch can, so probing a large weights file costs little.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not torch's zip format: no mmap
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(state, dict) and "model" in state and "recipe" in state and "model_config" in state:
        return state
    return None


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first line's first sentence of an error text, never cut mid-word beyond ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = line.split(". ", 1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def model_from_checkpoint(state: dict[str, Any]):
    """Rebuild the FerModel stored in a checkpoint (its ``model_config`` and weights); returns (model, state)."""
    from fer_bench.errors import FerBenchError
    from fer_bench.models.fer_model import create_model

    config = state.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError("checkpoint has no 'model_config'; it was not written by ferbench train")
    try:
        model = create_model(
            config["backbone"],
            num_classes=int(config["num_classes"]),
            img_size=int(config["img_size"]),
            pretrained=False,
            stem=config.get("stem", "patch"),
            heads=config.get("heads") or {},
            **config.get("backbone_kwargs", {}),
        )
    except FerBenchError as exc:
        raise CheckpointError(f"checkpoint model_config does not build a model: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint model_config is malformed ({type(exc).__name__}: {_first_sentence(str(exc))})"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:  # size mismatches: another class count, width or depth than model_config says
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line), _first_sentence(str(exc))
        )
        raise CheckpointError(
            f"checkpoint weights do not fit its model_config ({config.get('backbone')}, {config.get('num_classes')} "
            f"classes): {detail[:200]}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model
