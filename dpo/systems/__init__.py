"""Training systems: LightningModules that hold a model and train it, one per ``conf/system`` choice.

==============  ==============================================  ======================================
``system=``     module                                          trains
==============  ==============================================  ======================================
``dpo``         :class:`dpo.systems.dpo.DPOModule`              a policy with a ``conf/loss`` preference
                                                                loss (DPO, IPO, ..., SFT, Unlikelihood)
``reward_model`` :class:`dpo.systems.reward_model.RewardModelModule`  RLHF's reward model (Bradley-Terry)
``ppo``         :class:`dpo.systems.ppo.PPOModule`              a policy by PPO against a reward (RLHF)
==============  ==============================================  ======================================

:data:`SYSTEMS` says, per kind, what the config checks and the entry point need to know before
anything loads; :func:`dpo.train.build` assembles each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpo.systems.dpo import DPOSystemConfig
from dpo.systems.ppo import PPOConfig, ppo_steps_per_batch
from dpo.systems.reward_model import RewardModelConfig


@dataclass(frozen=True)
class SystemSpec:
    """What a training system needs from the rest of the config.

    Attributes:
        config: its ``conf/system`` schema.
        uses_loss: it trains with the ``conf/loss`` choice (else that group is ignored).
        data: what its batches hold: ``pairs`` (chosen and rejected), ``chosen`` (SFT rows) or
            ``prompts`` (prompts only: it samples its own responses); None: the loss decides.
        samples: it has a causal LM that the sampling callbacks can sample from.
        references: the ``reference.kind`` choices it runs with (None: the loss decides).
        shardable: it trains under FSDP2 (``trainer=fsdp``); else the config check refuses it.
        steps_per_batch: optimizer steps it makes per global batch, from the composed config.
        classifier: its model (``policy``) is a one-label sequence classifier, not a causal LM.
        checkpoint_extras: name prefixes of its own modules beside the policy in a checkpoint.
    """

    config: type
    uses_loss: bool
    data: str | None
    samples: bool
    references: tuple[str, ...] | None
    shardable: bool = True
    steps_per_batch: Callable[[Any], int] = lambda cfg: 1
    classifier: bool = False
    checkpoint_extras: tuple[str, ...] = ()


SYSTEMS: dict[str, SystemSpec] = {
    "dpo": SystemSpec(DPOSystemConfig, uses_loss=True, data=None, samples=True, references=None),
    "reward_model": SystemSpec(RewardModelConfig, uses_loss=False, data="pairs", samples=False, references=(),
                               classifier=True),
    "ppo": SystemSpec(PPOConfig, uses_loss=False, data="prompts", samples=True, references=("copy", "lora"),
                      shardable=False,  # its value head and rollouts are not sharded yet
                      steps_per_batch=ppo_steps_per_batch, checkpoint_extras=("value_head.",)),
}
