"""What labels online DPO's samples (:mod:`dpo.systems.online_dpo`): a reward's scores, or each
response's wins in a judge's round robin (:mod:`dpo.judges.tournament`); ``system.judge`` typed by kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpo.config.settings import ConfigError, typed
from dpo.judges import JUDGES, ORDERS
from dpo.judges.tournament import round_robin
from dpo.models.completions import score_texts


@dataclass
class SelfJudgeConfig:
    """``system.judge={kind: self}``: the model that sampled judges its samples, by the letter
    probabilities of :class:`dpo.judges.local.LocalLMJudge` (its ``orders`` and ``batch_size``)."""

    kind: str = "self"
    orders: str = "both"
    batch_size: int = 8


Labeller = Callable[[list[str], list[list[str]], int], list[list[float]]]
"""``(prompt texts, each prompt's k response texts, a seed per prompt) -> each response's score``."""


def reward_labels(reward: Callable[[list[str]], list[float]], include_prompt: bool) -> Labeller:
    """Scores of a reward (ground truth or a learned reward model), in one call per batch."""

    def label(prompts: list[str], responses: list[list[str]], seeds: list[int]) -> list[list[float]]:
        flat = score_texts(reward, [p for p, rs in zip(prompts, responses, strict=True) for _ in rs],
                           [r for rs in responses for r in rs], include_prompt)  # fmt: skip
        k = len(responses[0])
        return [flat[i : i + k] for i in range(0, len(flat), k)]

    label.reward = reward  # type: ignore[attr-defined]  # moved to the rank's device at fit start
    return label


def judge_labels(judge: Any, orders: str) -> Labeller:
    """Each response's wins in a round robin of the judge's verdicts (``orders``: shown both ways or one)."""
    return lambda prompts, responses, seeds: round_robin(judge, prompts, responses, orders, seeds)


def judge_config(node: Any) -> Any:
    """``system.judge`` typed by its kind (``self`` or a ``conf/judge`` kind); None when unset."""
    if node is None:
        return None
    kind = node.get("kind") if hasattr(node, "get") else None
    schemas = {"self": SelfJudgeConfig} | {k: cls.Config for k, cls in JUDGES.items()}
    if kind not in schemas:
        raise ConfigError(f"system.judge.kind={kind!r}: choose one of {sorted(schemas)} (or system.judge=null)")
    judge = typed(node, schemas[kind])
    if judge.orders not in ORDERS:
        raise ConfigError(f"system.judge.orders={judge.orders!r}: choose one of {ORDERS}")
    return judge
