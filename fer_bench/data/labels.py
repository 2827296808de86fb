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


#: Folder and CSV spellings accepted for each canonical expression (matched case-insensitively).
EXPRESSION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "ne", "calm"),
    "happiness": ("happiness", "happy", "ha", "joy"),
    "sadness": ("sadness", "sad", "sa"),
    "surprise": ("surprise", "surprised", "su"),
    "fear": ("fear", "fearful", "afraid", "af", "fe"),
    "disgust": ("disgust", "disgusted", "di"),
    "anger": ("anger", "angry", "an"),
    "contempt": ("contempt",),
}
_SYNONYM_TO_NAME = {syn: name for name, syns in EXPRESSION_SYNONYMS.items() for syn in syns}


def canonical_expression(text: str) -> str | None:
    """The canonical expression a folder or CSV label spells, or None.

    Example:
        >>> canonical_expression("Angry"), canonical_expression(" surprised "), canonical_expression("other")
        ('anger', 'surprise', None)
    """
    return _SYNONYM_TO_NAME.get(str(text).strip().lower())


#: RAF-DB compound classes (labels 1..11 in ``list_patition_label.txt``), a taxonomy of its own.
RAFDB_COMPOUND_CLASSES: tuple[str, ...] = (
    "happily_surprised",
    "happily_disgusted",
    "sadly_fearful",
    "sadly_angry",
    "sadly_surprised",
    "sadly_disgusted",
    "fearfully_angry",
    "fearfully_surprised",
    "angrily_surprised",
    "angrily_disgusted",
    "disgustedly_surprised",
)


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of class names; a label is an index into ``names``.

    Canonical spaces use the canonical expression names, so they can be compared across datasets; a
    non-canonical taxonomy (RAF-DB compound) cannot be scored against another dataset.
    """

    name: str
    names: tuple[str, ...]
    canonical: bool = True

    def __post_init__(self) -> None:
        if not self.canonical:
            return
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
_LABEL_SPACES.register("rafdb_compound", LabelSpace("rafdb_compound", RAFDB_COMPOUND_CLASSES, canonical=False))


def get_label_space(name: str) -> LabelSpace:
    """Return a named label space (``basic7``, ``all8`` or ``rafdb_compound``)."""
    return _LABEL_SPACES.get(name)


def list_label_spaces() -> list[str]:
    return _LABEL_SPACES.names()
