"""Key=value options from the command line and recipes, checked against the function that takes them."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from fer_bench.errors import ConfigError
from fer_bench.registry import did_you_mean

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_scalar(text: str) -> Any:
    """Parse a command-line value as a YAML scalar or list (numbers, true/false, null, [a, b]), never as code.

    Example:
        >>> parse_scalar("1e-4"), parse_scalar("8"), parse_scalar("aligned"), parse_scalar("[a, b]")
        (0.0001, 8, 'aligned', ['a', 'b'])
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.match(value):  # YAML 1.1 reads "1e-4" (no dot) as a string
        return float(value)
    return value


def parse_key_values(items: Iterable[str], *, flag: str) -> dict[str, Any]:
    """``["classes=7", "images=original"]`` → ``{"classes": 7, "images": "original"}``; ``flag`` names the option."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = parse_scalar(value)
    return out


def check_keywords(fn: Callable, options: dict[str, Any], *, what: str) -> None:
    """Raise ConfigError when ``options`` holds a keyword ``fn`` does not take (with a did-you-mean hint)."""
    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in accepted:
            hint = did_you_mean(key, accepted, n=2)
            known = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"{what}: unknown option {key!r}.{hint} Options: {known}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError naming the option."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"option {name}: expected one of {choices}, got {value!r}")
    return value
