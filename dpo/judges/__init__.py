"""Judges of pairwise comparisons, one interface (:class:`~dpo.judges.base.Judge`), three
backends: an OpenAI-compatible API (:mod:`.api`), a local causal LM (:mod:`.local`), a reward model
(:mod:`.reward`). ``conf/judge/<kind>.yaml`` picks one; :func:`build_judge` builds it."""

from __future__ import annotations

from typing import Any

from dpo.judges.api import ApiJudge
from dpo.judges.base import ORDERS, Comparison, Judge, JudgeError, Template, Verdict
from dpo.judges.local import LocalLMJudge
from dpo.judges.reward import RewardJudge

JUDGES: dict[str, Any] = {"api": ApiJudge, "local": LocalLMJudge, "reward": RewardJudge}
"""Judge kinds (``judge.kind``) and their classes; each class's ``Config`` is its group's schema."""


def build_judge(config: Any, template: Template, cache_dir: str) -> Judge:
    """The judge a typed ``conf/judge`` node describes (``dpo.commands.evaluate.check`` has checked
    ``orders`` against :data:`ORDERS` before any model loaded)."""
    if config.kind == "local":
        return LocalLMJudge(config, template, cache_dir)
    return JUDGES[config.kind](config, template)


__all__ = ["JUDGES", "ORDERS", "Comparison", "Judge", "JudgeError", "Template", "Verdict", "build_judge"]
