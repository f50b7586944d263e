"""Scores of ``k`` responses to one prompt from a pairwise judge: a round robin, each response scored
by its wins (a tie is half a win; an unreadable verdict counts for neither). What online DPO labels
its samples with when ``system.judge`` is set (:mod:`dpo.systems.online_dpo`); with ``k = 2`` it is
the judge's verdict itself (Guo et al. 2024, arXiv 2402.04792)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from dpo.judges.base import ORDERS, Comparison, Judge
from dpo.runtime.log import get_logger

log = get_logger(__name__)


def round_robin(judge: Judge, prompts: list[str], responses: list[list[str]], orders: str,
                seeds: Sequence[int]) -> list[list[float]]:  # fmt: skip
    """Per prompt, each response's wins against the others (``k(k-1)/2`` comparisons per prompt, twice
    with ``orders=both``, once in an order a coin seeded by the prompt's ``seeds`` entry picks with
    ``random``, so a prompt's verdicts do not depend on the prompts beside it), all asked
    in one call so an API judge caches and budgets them together."""
    if orders not in ORDERS:
        raise ValueError(f"judge.orders must be one of {ORDERS}, got {orders!r}")
    asked: list[tuple[int, int, int, bool]] = []  # (prompt, i, j, i shown as A)
    for p, texts in enumerate(responses):
        coin = random.Random(seeds[p])
        for i, j in itertools.combinations(range(len(texts)), 2):
            firsts = (True, False) if orders == "both" else (coin.random() < 0.5,)
            asked += [(p, i, j, first) for first in firsts]
    shown = [(responses[p][i], responses[p][j]) if first else (responses[p][j], responses[p][i])
             for p, i, j, first in asked]  # fmt: skip
    comparisons = [Comparison(prompts[p], a, b) for (p, *_), (a, b) in zip(asked, shown, strict=True)]
    scores = [[0.0] * len(texts) for texts in responses]
    verdicts = judge.judge(comparisons)
    if unread := [v.raw for v in verdicts if v.winner is None]:
        log.warning(f"judge: {len(unread)} of {len(verdicts)} verdicts unreadable (too long for a local judge's "
                    f"context, or no A/B in the answer), e.g. {unread[0][:80]!r}; they count for neither")  # fmt: skip
    for (p, i, j, first), verdict in zip(asked, verdicts, strict=True):
        if verdict.winner == "tie":
            scores[p][i] += 0.5
            scores[p][j] += 0.5
        elif verdict.winner is not None:
            i_won = (verdict.winner == "A") == first
            scores[p][i if i_won else j] += 1.0
    return scores
