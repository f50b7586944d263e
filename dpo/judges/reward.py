"""A reward model as judge (``judge=reward``): the response with the higher score wins.

Any reward of :mod:`dpo.rewards.registry` serves: a Hugging Face sequence classifier (``reward=hf_classifier``,
e.g. a preference reward model), or offline the ground-truth sentiment rewards (``vader``,
``tfidf``). Scores are of prompt + response (``include_prompt``); equal scores tie. The score does
not depend on which text is shown first, so ``orders: random`` costs nothing in accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dpo.judges.base import Comparison, Template, Verdict, winner_by_score
from dpo.rewards.registry import Reward, default_device, reward_from_config


class RewardJudge:
    """Verdicts by comparing reward scores; see the module docstring."""

    @dataclass
    class Config:
        """``conf/judge/reward.yaml``.

        Attributes:
            kind: ``reward``.
            reward: a ``conf/reward`` node (``name`` and the reward's parameters).
            include_prompt: score prompt + response (True) or the response alone.
            orders: ``random`` (the score ignores order) or ``both``.
        """

        kind: str = "reward"
        reward: Any = None
        include_prompt: bool = True
        orders: str = "random"

    def __init__(self, config: Config, template: Template, reward: Reward | None = None) -> None:
        self.config, self.template = config, template
        if reward is None:
            if not config.reward:
                raise ValueError("judge=reward needs judge.reward (e.g. judge/reward@judge.reward=vader)")
            reward = reward_from_config(dict(config.reward))
            if hasattr(reward, "to"):
                reward = reward.to(default_device())
        self.reward = reward

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "reward",
            "reward": dict(self.config.reward or {}),
            "include_prompt": self.config.include_prompt,
        }

    def judge(self, comparisons: list[Comparison]) -> list[Verdict]:
        prefix = [c.prompt if self.config.include_prompt else "" for c in comparisons]
        scores = self.reward([p + c.a for p, c in zip(prefix, comparisons, strict=True)]
                             + [p + c.b for p, c in zip(prefix, comparisons, strict=True)])  # fmt: skip
        n = len(comparisons)
        return [Verdict(winner_by_score(a, b), json.dumps({"score_A": a, "score_B": b}))
                for a, b in zip(scores[:n], scores[n:], strict=True)]  # fmt: skip
