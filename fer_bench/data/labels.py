"""The canonical expression labels and the named label spaces built from them.

Every dataset maps its own codes onto the eight canonical expressions, in this fixed order::

    0 neutral, 1 happiness, 2 sadness, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt

A *label space* is an ordered subset of these names (``basic7`` = all but contempt, ``all8`` = all eight). Labels in
a manifest are indices into the dataset's label space; a model and a report always say which space they use.
"""

from __future__ import annotations

from dataclasses import dataclass

from fer_bench.errors import ConfigError
from fer_bench.registry import Registry

CANONICAL_EXPRESSIONS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "sadness",
    "surprise",
    "fear",
    "disgust",
    "anger",
    "contempt",
)


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of canonical expression names; a label is an index into ``names``."""

    name: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in CANONICAL_EXPRESSIONS]
        if unknown:
            raise ConfigError(
                f"label space {self.name!r}: {unknown} are not canonical expressions {CANONICAL_EXPRESSIONS}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, expression: str) -> int:
        """Index of a canonical expression name in this space."""
        try:
            return self.names.index(expression)
        except ValueError:
            raise ConfigError(
                f"expression {expression!r} is not in label space {self.name!r} {list(self.names)}"
            ) from None


_LABEL_SPACES: Registry[LabelSpace] = Registry("label space")
_LABEL_SPACES.register("basic7", LabelSpace("basic7", CANONICAL_EXPRESSIONS[:7]))
_LABEL_SPACES.register("all8", LabelSpace("all8", CANONICAL_EXPRESSIONS))


def get_label_space(name: str) -> LabelSpace:
    """Return a named label space (``basic7`` or ``all8``)."""
    return _LABEL_SPACES.get(name)


def list_label_spaces() -> list[str]:
    return _LABEL_SPACES.names()
