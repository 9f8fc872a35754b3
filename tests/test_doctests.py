"""Every ``>>>`` example in compose's modules runs, and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import compose

ROOT = Path(compose.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="compose."):
        spec = info.module_finder.find_spec(info.name)  # type: ignore[union-attr]
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin is not None and origin.suffix == ".py" and ">>>" in origin.read_text():
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_examples_are_found():
    assert {"compose.composer", "compose.strategies.calm", "compose.strategies.block_expand"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
