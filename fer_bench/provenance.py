"""Where a result came from: the code version recorded in recipes, checkpoints and evaluation results."""

from __future__ import annotations

import subprocess


def git_sha() -> str:
    """The checked-out commit of the working directory, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
