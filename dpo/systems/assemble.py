"""The parts every system's ``build`` assembles from a checked config: the policy and its reference,
the optimizer settings the run's precision decides, the guard.

``start`` is the entry point's :class:`dpo.commands.train.Start`: ``start.model`` (the resolved
:class:`~dpo.models.load.ModelConfig`) and ``start.plan`` (:class:`dpo.config.validate.Plan`: layout, precision)
are read here, nothing else.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from dpo.config.settings import typed
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
