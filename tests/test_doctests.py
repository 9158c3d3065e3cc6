"""Runs the docstring examples of every module of the package (`qsilk/**.py`; the host adapters
import no host module, so they load here too), as einops' ``test_doctests_examples`` does: the
examples in the docs are checked like any test."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import qsilk

CORE_MODULES = sorted(m.name for m in pkgutil.walk_packages(qsilk.__path__, "qsilk.")
                      if not m.name.endswith("__main__"))


def test_core_modules_found():
    assert {"qsilk.clamp", "qsilk.aqclip", "qsilk.probe", "qsilk.settings", "qsilk.stabilizer",
            "qsilk.hosts.patcher", "qsilk.hosts.comfy"} <= set(CORE_MODULES)


@pytest.mark.parametrize("name", CORE_MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
