"""Every module of the package imports (catches syntax errors and broken imports in rarely run code)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpo.__path__, prefix="dpo."))


def test_found_the_modules():
    assert {"dpo.losses", "dpo.logprobs", "dpo.module", "dpo.train", "dpo.data.datamodule"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    importlib.import_module(name)
