"""Sharing work between ranks so that every rank runs the same number of forwards (FSDP needs it)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_share(items: list[Any], world: int, rank: int) -> list[tuple[int, Any]]:
    """This rank's ``(index, item)`` share; every rank gets as many (the list wraps around), so
    under FSDP all ranks run the same number of forwards."""
    share = -(-len(items) // world)
    return [(i, items[i % len(items)]) for i in range(rank * share, (rank + 1) * share)]


def gather_rows(rows: list[dict[str, Any]], world: int, rank: int, n: int) -> list[dict[str, Any]] | None:
    """All ranks' ``rows`` on rank 0, one per ``index`` below ``n`` (the wrapped-around extras
    dropped), in index order; None on the other ranks."""
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return None
    return sorted({r["index"]: r for r in rows if r["index"] < n}.values(), key=lambda r: r["index"])
