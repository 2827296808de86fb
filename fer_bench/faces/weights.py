"""Finding detector weights offline, loading them safely, and naming them by their SHA-256 (``sha256_file``)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from fer_bench._io import sha256_file
from fer_bench.errors import WeightsUnavailableError

__all__ = ["load_state_dict_bytes", "load_strict", "read_zip_member", "sha256_file", "weights_dir"]


def weights_dir() -> Path:
    """Where fer_bench looks for downloaded weights: ``$FER_BENCH_WEIGHTS_DIR``, else ``~/.cache/fer_bench/weights``."""
    if os.environ.get("FER_BENCH_WEIGHTS_DIR"):
        return Path(os.environ["FER_BENCH_WEIGHTS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fer_bench" / "weights"


def load_state_dict_bytes(data: bytes, *, where: str) -> dict[str, torch.Tensor]:
    """A state dict from the bytes of a ``torch.save`` file (``weights_only=True``: data, never code).

    Raises:
        WeightsUnavailableError: the bytes are not a plain tensor state dict; names ``where``.
    """
    if not data:
        raise WeightsUnavailableError(f"{where}: an empty file, not weights; fetch it again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated, foreign or pickled-code file
        reason = (
            "it holds objects other than tensors, which are never unpickled"
            if "Weights only load failed" in str(exc)
            else "truncated, or not a torch.save file"
        )
        raise WeightsUnavailableError(f"{where}: not a loadable weights file ({reason}); fetch it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{where}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def read_zip_member(path: Path, suffix: str) -> tuple[bytes, str]:
    """The bytes of the one member of zip ``path`` whose name ends with ``suffix`` (and that name)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise WeightsUnavailableError(f"{path}: expected one member ending in {suffix!r}, found {len(names)}")
            return archive.read(names[0]), names[0]
    except zipfile.BadZipFile:
        raise WeightsUnavailableError(f"{path}: not a readable zip file") from None


def load_strict(network: nn.Module, state: dict[str, torch.Tensor], *, where: str, what: str) -> None:
    """Load ``state`` into ``network`` with ``strict=True``, first refusing a foreign state dict in one line that
    names ``where``, ``what`` it should have been, and the first few missing, unexpected or mis-shaped keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")

    problems = [
        f"{label}: {few(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if items
    ]
    if problems:
        raise WeightsUnavailableError(f"{where}: not {what} weights ({'; '.join(problems)})")
    network.load_state_dict(state, strict=True)
