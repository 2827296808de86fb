"""Every ``Example:`` in a docstring is run: the examples are checkable claims, not decoration."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fer_bench

MODULES = sorted(m.name for m in pkgutil.walk_packages(fer_bench.__path__, "fer_bench.") if m.name != "fer_bench.cli")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
