"""A small name → object registry with helpful errors (one per kind: datasets, models, heads)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from fer_bench.errors import UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> str:
    """`` Did you mean 'a', 'b'?`` with the names in ``choices`` nearest to ``name`` (difflib ratio), or "".

    Example:
        >>> did_you_mean("rafbd", ["rafdb", "affectnet", "ferplus"])
        " Did you mean 'rafdb'?"
    """
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Maps names to objects; duplicates are an error, unknown names suggest the closest ones.

    Args:
        kind: What is registered ("dataset", "head", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""

        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = value
            return value

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Return the entry for ``name``; unknown names raise UnknownNameError with suggestions."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, self._entries)
        return f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
