"""The one error family of fer_bench.

Only these errors are turned into a one-line message and exit code 2 by the CLI; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class FerBenchError(Exception):
    """Base class: a problem with the user's input (file, recipe, argument), explained in one line."""


class ConfigError(FerBenchError, ValueError):
    """A recipe key, option or argument has a bad value."""


class DataError(FerBenchError, ValueError):
    """A dataset file is missing, malformed or corrupt."""


class UnknownNameError(FerBenchError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(FerBenchError, ValueError):
    """A checkpoint that cannot be read safely."""


class WeightsUnavailableError(FerBenchError, RuntimeError):
    """Pretrained weights were asked for but cannot be obtained offline."""
