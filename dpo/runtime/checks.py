"""One way to refuse settings: every broken rule of a config node at once, each named by its key."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Rule = tuple[str, Any, bool, str]
"""``(key, value, ok, rule)``: ``ok`` is whether ``value`` keeps the ``rule`` (e.g. ``">= 1"``)."""


def refuse(rules: Iterable[Rule], *more: str | None, prefix: str = "") -> None:
    """Raise one ``ValueError`` naming every broken rule as ``<prefix><key>=<value> must be <rule>``,
    then every other problem in ``more`` (None: no problem). Settings' ``__post_init__`` call it, so a
    config with several mistakes is refused once, with all of them."""
    problems = [f"{prefix}{key}={value!r} must be {rule}" for key, value, ok, rule in rules if not ok]
    problems += [p for p in more if p]
    if problems:
        raise ValueError("; ".join(problems))
