"""Training systems: LightningModules that hold a model and train it, one per ``conf/system`` choice.

==============  ==============================================  ======================================
``system=``     module                                          trains
==============  ==============================================  ======================================
``dpo``         :class:`dpo.systems.dpo.DPOModule`              a policy with a ``conf/loss`` preference
                                                                loss (DPO, IPO, ..., SFT, Unlikelihood)
``reward_model`` :class:`dpo.systems.reward_model.RewardModelModule`  RLHF's reward model (Bradley-Terry)
``ppo``         :class:`dpo.systems.ppo.PPOModule`              a policy by PPO against a reward (RLHF)
``online_dpo``  :class:`dpo.systems.online_dpo.OnlineDPOModule` a policy on pairs of its own samples
                                                                (online DPO; iterative DPO in rounds)
``grpo``        :class:`dpo.systems.grpo.GRPOModule`            a policy by GRPO (group baseline, no critic)
``rloo``        :class:`dpo.systems.grpo.GRPOModule`            a policy by RLOO (leave-one-out baseline)
``kto``         :class:`dpo.systems.kto.KTOModule`              a policy by KTO on labelled completions
==============  ==============================================  ======================================

:data:`SYSTEMS` holds each system's :class:`~dpo.systems.spec.SystemSpec`: its schema, how it is
built, what its batches hold, which references it accepts, its own config checks, its name in the
run summary and its family in the figures. A new system is one file here exporting ``SPEC``, one
line below and one ``conf/system/<kind>.yaml``.
"""

from __future__ import annotations

from dpo.systems import dpo, grpo, kto, online_dpo, ppo, reward_model, rloo
from dpo.systems.spec import SystemSpec

SYSTEMS: dict[str, SystemSpec] = {
    "dpo": dpo.SPEC, "reward_model": reward_model.SPEC, "ppo": ppo.SPEC, "online_dpo": online_dpo.SPEC,
    "grpo": grpo.SPEC, "rloo": rloo.SPEC, "kto": kto.SPEC,
}
"""``system.kind`` -> its spec."""
