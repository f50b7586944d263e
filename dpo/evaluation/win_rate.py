"""Win rates of a policy against a baseline from pairwise judgments, with standard errors.

Definitions (the README's "Win rates" section repeats them):

- A judgment scores the policy 1 if its response won, 0 if the baseline's won, 1/2 for a tie; an
  unreadable verdict scores nothing (a parse failure, left out of the denominator).
- A prompt's score is the mean of its judgments' scores (one judgment, or two when both A/B orders
  are judged: averaging them first removes the judge's position preference from that prompt and
  keeps the prompts independent). A prompt none of whose judgments could be read is left out.
- The win rate is the mean of the prompt scores over the ``n`` prompts kept; its standard error is
  their sample standard deviation (ddof 1) over ``sqrt(n)``: prompts are the independent units.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from dpo.judges.base import Winner


def policy_score(winner: Winner | None, policy_first: bool) -> float | None:
    """The policy's score in one judgment: 1 won, 0 lost, 0.5 tie, None unreadable."""
    if winner is None:
        return None
    if winner == "tie":
        return 0.5
    return 1.0 if (winner == "A") == policy_first else 0.0


@dataclass(frozen=True)
class WinRate:
    """One (policy, temperature)'s result.

    Attributes:
        win_rate: mean prompt score (NaN when no prompt is left).
        stderr: standard error of ``win_rate`` over prompts (NaN below two prompts).
        n: prompts scored.
        judgments: readable judgments.
        parse_failures: judgments whose verdict could not be read.
        ties: readable judgments that tied.
        a_wins: of the readable non-tie judgments, how many the response shown first (``A``) won.
        decided: readable non-tie judgments (``a_wins / decided`` is the position bias).
    """

    win_rate: float
    stderr: float
    n: int
    judgments: int
    parse_failures: int
    ties: int
    a_wins: int
    decided: int

    @property
    def position_bias(self) -> float:
        """How often the first-shown response won (0.5: no preference for a position)."""
        return self.a_wins / self.decided if self.decided else math.nan


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std, ddof 1, over sqrt(n)); NaN where undefined."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_rate(judgments: Iterable[tuple[int, Winner | None, bool]]) -> WinRate:
    """The win rate of ``(prompt id, verdict, policy shown first)`` judgments; see the module docstring."""
    per_prompt: dict[int, list[float]] = defaultdict(list)
    failures = ties = a_wins = decided = readable = 0
    for prompt, winner, policy_first in judgments:
        score = policy_score(winner, policy_first)
        if score is None:
            failures += 1
            continue
        readable += 1
        per_prompt[prompt].append(score)
        ties += winner == "tie"
        if winner in ("A", "B"):
            decided += 1
            a_wins += winner == "A"
    mean, se = mean_and_stderr([sum(s) / len(s) for s in per_prompt.values()])
    return WinRate(mean, se, len(per_prompt), readable, failures, ties, a_wins, decided)
