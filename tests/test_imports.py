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


def test_notebooks_are_stripped_and_define_no_functions():
    """notebooks/ holds exploration only: no stored outputs, no logic of its own (STYLE.md)."""
    import json
    from pathlib import Path

    notebooks = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path
                assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell["source"]), path
