"""The parts every system's ``build`` assembles from a checked config: the policy and its reference,
the optimizer settings the run's precision decides, the guard.

``start`` is the entry point's :class:`dpo.commands.train.Start`: ``start.model`` (the resolved
:class:`~dpo.models.load.ModelConfig`) and ``start.plan`` (:class:`dpo.config.validate.Plan`: layout, precision)
are read here, nothing else.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from dpo.config.settings import ConfigError, typed
from dpo.models.forward import attention_for
from dpo.models.load import load_policy, model_identity
from dpo.systems.base import GuardConfig, OptimConfig
from dpo.systems.reference import REFERENCES, Reference, build_reference


def build_policy_and_reference(cfg: DictConfig, start: Any, tokenizer: Any, *, needs_reference: bool) -> tuple[
        Any, Reference]:  # fmt: skip
    """The policy and its :class:`~dpo.systems.reference.Reference` (``conf/reference``)."""
    policy = load_policy(start.model, tokenizer=tokenizer, attn_implementation=attention_for(start.plan.layout))
    return build_reference(
        typed(cfg.reference, REFERENCES[cfg.reference.kind].Config), policy, needs_reference=needs_reference,
        cache_dir=cfg.data.cache_dir,
        identity={"model": model_identity(start.model, cfg.seed), "precision": str(cfg.trainer.precision)},
    )  # fmt: skip


def optim_config(cfg: DictConfig, start: Any) -> OptimConfig:
    """``conf/optim`` with the optimizer options the run's precision decides (:mod:`dpo.config.precision`)."""
    optim = typed(cfg.optim, OptimConfig)
    optim.optimizer = start.plan.precision.optimizer_options(optim.optimizer)
    return optim


def guard_config(cfg: DictConfig) -> GuardConfig:
    """``guard``: what a non-finite step, too-small updates and changed data do."""
    return typed(cfg.guard, GuardConfig)


def trained_reward(cfg: DictConfig) -> DictConfig:
    """The reward a sampling system trains against: ``system.reward``, or the run's ``reward`` group
    (the ground truth the evaluation uses) when that is null."""
    return cfg.system.reward if cfg.system.reward is not None else cfg.reward


def check_reward_and_minibatches(cfg: DictConfig) -> None:
    """``system.reward`` is null or names a reward; ``system.minibatch_size`` divides each rank's
    samples per batch (PPO, GRPO, RLOO)."""
    system = cfg.system
    if system.reward is not None and "name" not in system.reward:
        raise ConfigError("system.reward must be null (the ground truth, `reward`) or a reward config with a `name`")
    samples = cfg.data.micro_batch_size * system.samples_per_prompt
    if system.minibatch_size < 1 or samples % system.minibatch_size:
        raise ConfigError(
            f"system.minibatch_size={system.minibatch_size} must divide each rank's samples per batch: "
            f"data.micro_batch_size={cfg.data.micro_batch_size} x system.samples_per_prompt={system.samples_per_prompt}"
        )
