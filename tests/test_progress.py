"""Progress bars: drawn on a terminal, on rank 0; never in logs or CI output."""

from __future__ import annotations

import io
import sys

import dpo.runtime.progress
from dpo.runtime.progress import track


def test_no_bar_off_a_terminal(capsys):
    assert list(track(range(5), "work")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    from rich.console import Console

    monkeypatch.setattr("rich.progress.get_console", lambda: Console(file=screen, force_terminal=True))
    assert dpo.runtime.progress.shown()
    assert list(track(iter(range(3)), "tokenize train", total=3)) == [0, 1, 2]
    assert "tokenize train" in screen.getvalue()
