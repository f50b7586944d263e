"""The RLOO training system: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv
2402.14740). GRPO's machinery (:mod:`dpo.systems.grpo`) with RLOO's choices: each sample's baseline
is the mean score of the prompt's other ``k - 1`` samples, no division by the group's spread, and
the KL to the reference a penalty on the score (``r - beta * sum_t (log pi - log pi_ref)``, the k1
estimate) rather than a loss term; the loss is the sequence's summed token terms (``dr_grpo``'s
aggregation: REINFORCE on the whole response, divided by a constant)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpo.systems.grpo import SPEC as GRPO_SPEC
from dpo.systems.grpo import GRPOConfig, builder


@dataclass
class RLOOConfig(GRPOConfig):
    """``conf/system/rloo.yaml``: :class:`dpo.systems.grpo.GRPOConfig` with RLOO's defaults.

    Attributes:
        kind: ``rloo``.
    """

    kind: str = "rloo"
    baseline: str = "leave_one_out"
    scale_rewards: bool = False
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    loss_type: str = "dr_grpo"


SPEC = dataclasses.replace(GRPO_SPEC, config=RLOOConfig, build=builder(RLOOConfig))
