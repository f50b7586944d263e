"""What every judge shares: the comparison it is shown, the template that words it, the verdict.

A comparison shows the judge a prompt and two responses under the labels ``A`` and ``B``; which of
the two texts is ``A`` is the caller's business (``dpo-eval`` draws it per comparison from a seed and
records it). A verdict is ``"A"``, ``"B"``, ``"tie"`` or None (the judge's answer could not be read:
counted as a parse failure and left out of the win rate's denominator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

Winner = Literal["A", "B", "tie"]

ORDERS = ("random", "both")
"""How a comparison's two responses are shown: one order a seeded coin picks, or both (the position bias)."""


class JudgeError(RuntimeError):
    """A judge that cannot work as configured (no API key, a 4xx answer, too many requests)."""


@dataclass(frozen=True)
class Comparison:
    """One question to a judge: ``prompt``, response ``a`` shown first, response ``b`` second."""

    prompt: str
    a: str
    b: str


@dataclass(frozen=True)
class Verdict:
    """A judge's answer: the winner (None: unreadable) and the raw output it was read from."""

    winner: Winner | None
    raw: str


@dataclass
class Template:
    """``conf/template``: how a comparison is put to a judge, in words a user can replace.

    The API judge sends ``system`` (if any) and ``user`` as chat messages and reads the letter after
    the last ``verdict_cue`` (or a lone letter on the last line). The local LM judge reads the
    probabilities of the two letters right after the cue.

    Attributes:
        name: names the template in the results and the cache key.
        system: the system message; None: none.
        user: the question, with ``{prompt}``, ``{a}`` and ``{b}`` filled in.
        verdict_cue: the text after which the judge writes only ``A`` or ``B``.
    """

    name: str = "custom"
    system: str | None = None
    user: str = "{prompt}\n\nA: {a}\n\nB: {b}\n\nWhich response is better?"
    verdict_cue: str = "Preferred:"

    def __post_init__(self) -> None:
        missing = [k for k in ("{prompt}", "{a}", "{b}") if k not in self.user]
        if missing:
            raise ValueError(f"template.user must contain {', '.join(missing)}")
        if not self.verdict_cue.strip():
            raise ValueError("template.verdict_cue must not be empty")

    def messages(self, c: Comparison) -> list[dict[str, str]]:
        """The chat messages of ``c``: an optional system message and the filled user message."""
        user = self.user.replace("{prompt}", c.prompt.strip()).replace("{a}", c.a.strip()).replace("{b}", c.b.strip())
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}
        ]

    def parse(self, text: str) -> Winner | None:
        """The letter of a judge's answer: its last non-empty line, without the cue, must be ``A`` or
        ``B`` (quotes, brackets, stars and a full stop around it are ignored); anything else is None."""
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if not lines:
            return None
        last = lines[-1]
        cue = self.verdict_cue.strip()
        if cue in last:
            last = last[last.rindex(cue) + len(cue) :]
        letter = re.sub(r"""^[\s"'*(\[`]+|[\s"'*)\]`.]+$""", "", last)
        return letter if letter in ("A", "B") else None  # type: ignore[return-value]


class Judge(Protocol):
    """A judge: it answers a list of comparisons, in order; ``describe`` goes into the results."""

    template: Template

    def judge(self, comparisons: list[Comparison]) -> list[Verdict]: ...

    def describe(self) -> dict[str, object]: ...


def winner_by_score(score_a: float, score_b: float) -> Winner:
    """The verdict of two scores: the higher wins; equal scores tie."""
    return "A" if score_a > score_b else "B" if score_b > score_a else "tie"
