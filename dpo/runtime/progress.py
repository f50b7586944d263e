"""Progress bars for the long steps outside Lightning's loops (tokenizing, sampling, scoring).

One style with Lightning's own bars (rich), shown only where a person watches: on a terminal, on
global rank 0. Logs and CI output get none.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.utilities import rank_zero_only

T = TypeVar("T")


def shown() -> bool:
    """Whether bars are drawn: standard error is a terminal and this is global rank 0."""
    return sys.stderr.isatty() and getattr(rank_zero_only, "rank", 0) == 0


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items``, drawing a bar when :func:`shown`; ``total`` for iterables without a length."""
    if not shown():
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
