"""Issue 23: every command's bad input is refused in one named line, before expensive work, and its
valid unusual input runs. The cases (tests/bad_input_cases.py) run here in this process through each
command's Hydra entry; ``experiments/fuzz/fuzz_commands.py`` runs the same cases as real console
commands and commits their verdicts (experiments/fuzz/cases.md)."""

from __future__ import annotations

import importlib

import pytest
from bad_input_cases import CASES, COMMANDS, last_error, verdict
from tests_helpers import run_entry

pytestmark = pytest.mark.slow


def test_the_sweep_covers_every_command_with_at_least_150_inputs():
    assert len(CASES) >= 150 and {c.command for c in CASES} == set(COMMANDS)
    assert len({c.id for c in CASES}) == len(CASES)  # each case named once
    assert all(c.names for c in CASES if c.bad)  # every refusal must name something


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name_and_valid_input_runs(case, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    main = importlib.import_module(COMMANDS[case.command]).main
    rc, out = run_entry(main, *case.argv(tmp_path), cwd=tmp_path)
    assert verdict(case, rc, out) == ("clean" if case.bad else "ok"), f"{rc}: {last_error(out)}\n{out[-3000:]}"
