"""Preference pairs among one prompt's scored responses: which (chosen, rejected) an online DPO batch
trains on (:mod:`dpo.systems.online_dpo`). Pure: scores in, index pairs out."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum


class PairMode(str, Enum):
    """How pairs are drawn from ``k`` scored responses (``system.pairs``).

    * ``best_worst``: the highest-scored against the lowest (Guo et al. 2024, arXiv 2402.04792, with
      ``k = 2``; Xu et al. 2023, arXiv 2312.16682 and Yuan et al. 2024, arXiv 2401.10020, for ``k > 2``).
    * ``all``: every pair whose gap passes the margin, widest gaps first (``max_pairs`` of them).
    """

    best_worst = "best_worst"
    all = "all"


def preference_pairs(
    scores: Sequence[float], mode: PairMode | str, min_margin: float = 0.0, max_pairs: int | None = None
) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` indices into ``scores``: a pair is kept when ``s_chosen - s_rejected`` is
    > 0 and >= ``min_margin`` (an exact tie never makes a pair, as ``dpo-pair ties=skip``).

    ``best_worst``: at most one pair, the first index of the highest score against the last index
    of the lowest. ``all``: every kept pair ordered by its gap (widest first; ties by index), the
    first ``max_pairs`` (None: all).
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")

    def kept(i: int, j: int) -> bool:
        gap = scores[i] - scores[j]
        return gap > 0 and gap >= min_margin

    k = len(scores)
    if PairMode(mode) == PairMode.best_worst:
        best = max(range(k), key=lambda i: (scores[i], -i))
        worst = min(range(k), key=lambda i: (scores[i], -i))
        return [(best, worst)] if k > 1 and kept(best, worst) else []
    pairs = sorted(((i, j) for i in range(k) for j in range(k) if i != j and kept(i, j)),
                   key=lambda p: (-(scores[p[0]] - scores[p[1]]), p))  # fmt: skip
    return pairs if max_pairs is None else pairs[:max_pairs]
