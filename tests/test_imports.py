"""Every module of the package imports (catches syntax errors and broken imports in rarely run code)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest

import dpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpo.__path__, prefix="dpo."))


def test_found_the_modules():
    expected = {"dpo.maths.losses", "dpo.maths.logprobs", "dpo.models.forward", "dpo.systems.dpo", "dpo.commands.train",
                "dpo.data.datamodule"}  # fmt: skip
    assert expected <= set(MODULES)


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


def imports_of(module: str) -> set[str]:
    """The ``dpo`` modules ``module`` imports (anywhere in its source, lazy imports included)."""
    import ast

    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpo")}
    return found


# (importer prefix, forbidden prefixes): the levels of dpo/, lowest first (STYLE.md). Maths knows no
# models; data knows no models' forward or systems; models know no systems; systems never import
# their observers (evaluation, report) or the commands; nothing below the commands imports them.
LAYERS = [
    ("dpo.maths", ("dpo.models", "dpo.rewards", "dpo.systems", "dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.runtime", ("dpo.models", "dpo.systems", "dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.data", ("dpo.models.forward", "dpo.models.attention", "dpo.systems", "dpo.evaluation", "dpo.commands")),
    ("dpo.models", ("dpo.systems", "dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.rewards", ("dpo.systems", "dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.judges", ("dpo.systems", "dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.systems", ("dpo.evaluation", "dpo.report", "dpo.commands")),
    ("dpo.evaluation", ("dpo.commands",)),
    ("dpo.report", ("dpo.commands",)),
    ("dpo.config", ("dpo.commands",)),
]


@pytest.mark.parametrize("name", MODULES)
def test_imports_follow_the_layers(name):
    imported = imports_of(name)
    for importer, forbidden in LAYERS:
        if name.startswith(importer):
            assert not {m for m in imported if m.startswith(forbidden)}, (name, forbidden)
    if name != "dpo.models.forward":
        assert "dpo.models.attention" not in imported, f"{name}: only dpo.models.forward runs segment attention"
    if name.startswith("dpo.commands.") and name != "dpo.commands.cli":  # commands share cli.py, never each other
        assert not {m for m in imported if m.startswith("dpo.commands.")} - {"dpo.commands.cli"}, name


def edges_of(module: str) -> set[str]:
    """The ``dpo`` modules ``module`` imports by name, lazy imports included; ``from package import
    name`` counts the submodule ``package.name`` when there is one."""
    edges = set()
    for target in imports_of(module):
        edges.add(target)
    import ast

    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo"):
            edges |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return edges & set(MODULES) - {module}


def test_no_import_circle():
    """Issue 24: dpo.config -> dpo.schema -> dpo.report.naming -> dpo.config (the old module names) ran
    only because the last import was lazy. No module reaches itself through the imports it names, lazy ones included."""
    graph = {m: edges_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, " -> ".join([*path[path.index(n):], n]) if n in path else (m, n)
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_module_over_400_lines_and_no_function_over_60():
    """Issue 24's size limits, so the layout stays readable as systems arrive."""
    import ast
    from pathlib import Path

    too_long = []
    for path in sorted(Path(dpo.__file__).parent.rglob("*.py")):
        source = path.read_text()
        if (n := len(source.splitlines())) > 400:
            too_long.append(f"{path.name}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
