"""A judge's agreement with human labels, beside the humans' agreement with each other (the DPO
paper's Sec. 6.4 asks this of GPT-4 before trusting its win rates).

Definitions (``dpo-eval agreement=true``; docs/win_rates.md repeats them):

- A labelled comparison is a prompt, two responses and the labels people gave it: each label is the
  response one person preferred. Rows of a preference data set with the same prompt and the same two
  responses are one comparison with several labels (TL;DR's comparisons hold several workers' choices
  for some pairs); a row alone is a comparison with one label.
- A judgment picks a response (or ties: 1/2 with every label, or is unreadable: left out). The
  judge's agreement on a comparison is the mean, over its readable judgments and its labels, of
  "the judge picked the labelled response"; with both A/B orders judged, the two judgments average
  first, as for win rates. The judge-human agreement is the mean over comparisons, its standard
  error their sample standard deviation over ``sqrt(n)`` (comparisons are the independent units).
- Human-human agreement, over the comparisons with two or more labels: per comparison the fraction
  of pairs of labels that agree, then the mean over comparisons and its standard error. It is the
  ceiling a judge is compared with: the judge-human number counts each label as one person's view,
  so a judge that always sided with the majority could exceed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from dpo.evaluation.judges.base import Winner
from dpo.evaluation.win_rate import mean_and_stderr


@dataclass(frozen=True)
class Labelled:
    """One labelled comparison: ``prompt``, its two responses ``x`` and ``y`` (in the order first
    seen) and ``labels``, the response each person preferred (each one of ``x`` or ``y``)."""

    index: int
    prompt: str
    x: str
    y: str
    labels: tuple[str, ...]


def group_labelled(rows: Iterable[tuple[str, str, str]]) -> list[Labelled]:
    """Comparisons from ``(prompt, preferred, other)`` rows: rows of one prompt and one pair of
    responses (either order) are one comparison, each row one label. Rows whose two responses are
    equal carry no preference and are left out."""
    found: dict[tuple[str, frozenset[str]], tuple[str, str, list[str]]] = {}
    for prompt, preferred, other in rows:
        if preferred == other:
            continue
        key = (prompt, frozenset((preferred, other)))
        found.setdefault(key, (preferred, other, []))[2].append(preferred)
    return [Labelled(i, prompt, x, y, tuple(labels)) for i, ((prompt, _), (x, y, labels)) in enumerate(found.items())]


def human_agreement(labels: Sequence[str]) -> float | None:
    """The fraction of pairs of ``labels`` that agree; None below two labels."""
    pairs = list(combinations(labels, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def judge_score(picked: str | None, labels: Sequence[str]) -> float:
    """One judgment's agreement with a comparison's labels: the fraction of labels naming the
    response the judge picked; ``picked`` None is a tie (1/2)."""
    if picked is None:
        return 0.5
    return sum(label == picked for label in labels) / len(labels)


@dataclass(frozen=True)
class Agreement:
    """The agreement of one judge (and template) with the labels of ``n`` comparisons.

    Attributes:
        judge_human: mean over comparisons of the judge's agreement with their labels (NaN: none).
        judge_human_se: its standard error over comparisons.
        n: comparisons with a readable judgment.
        human_human: mean over comparisons with two or more labels of their labels' pairwise
            agreement (NaN: no such comparison).
        human_human_se: its standard error.
        n_multi: comparisons with two or more labels (whether or not the judge could be read).
        judgments: readable judgments; parse_failures: unreadable ones; ties: readable ties.
        a_wins / decided: of the readable non-tie judgments, those the response shown first won
            (the position bias, 0.5: none).
    """

    judge_human: float
    judge_human_se: float
    n: int
    human_human: float
    human_human_se: float
    n_multi: int
    judgments: int
    parse_failures: int
    ties: int
    a_wins: int
    decided: int

    @property
    def position_bias(self) -> float:
        return self.a_wins / self.decided if self.decided else float("nan")


def agreement(judged: Iterable[tuple[Labelled, Winner | None, bool]]) -> Agreement:
    """The agreement of ``(comparison, verdict, x shown first)`` judgments with the comparisons'
    labels; see the module docstring."""
    scores: dict[int, list[float]] = {}
    seen: dict[int, Labelled] = {}
    failures = ties = a_wins = decided = readable = 0
    for c, winner, x_first in judged:
        seen[c.index] = c
        if winner is None:
            failures += 1
            continue
        readable += 1
        if winner == "tie":
            ties += 1
            picked = None
        else:
            decided += 1
            a_wins += winner == "A"
            picked = c.x if (winner == "A") == x_first else c.y
        scores.setdefault(c.index, []).append(judge_score(picked, c.labels))
    judge_mean, judge_se = mean_and_stderr([sum(s) / len(s) for s in scores.values()])
    multi = [a for a in (human_agreement(c.labels) for c in seen.values()) if a is not None]
    human_mean, human_se = mean_and_stderr(multi)
    return Agreement(judge_mean, judge_se, len(scores), human_mean, human_se, len(multi), readable, failures, ties,
                     a_wins, decided)  # fmt: skip
