"""Where a result came from: the code version recorded in recipes, checkpoints and evaluation results."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """fer_bench's own commit (the checkout this package is imported from, whatever the caller's working folder),
    with ``-dirty`` when its tracked files have uncommitted changes; ``unknown`` for an installed wheel or without
    git.

    Example:
        >>> len(git_sha().split("-")[0]) in (40, 7)  # a full sha, or "unknown"
        True
    """

    def run(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        top = run("rev-parse", "--show-toplevel")
        # only our own checkout: an installed copy inside someone else's repository must not report theirs
        if not top or (Path(top) / "fer_bench" / "provenance.py").resolve() != Path(__file__).resolve():
            return "unknown"
        sha = run("rev-parse", "HEAD")
        if not sha:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"
