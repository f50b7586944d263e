"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): a policy trained on unpaired completions, each
labelled desirable or undesirable, against a frozen reference and a KL reference point.

Its batches are KTO's rows (:mod:`dpo.data.unpaired`): labelled completions (``data.source.format:
unpaired``) or preference pairs unpaired as TRL does, each laid out as a pair whose ``chosen`` is the
completion and whose ``rejected`` is another row's completion under this prompt (the mismatched pair
the KL reference point is estimated from); the loss is :func:`dpo.maths.losses.unpaired.kto_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dpo.config.settings import ConfigError, typed
from dpo.data.batch import ScoredBatch
from dpo.maths.losses.unpaired import kto_loss, kto_reference_point
from dpo.models.forward import score_pairs
from dpo.runtime.checks import refuse
from dpo.systems.assemble import build_policy_and_reference, guard_config, optim_config
from dpo.systems.base import GuardConfig, OptimConfig
from dpo.systems.dpo import PairSystem
from dpo.systems.reference import Reference
from dpo.systems.spec import SystemSpec


@dataclass
class KTOConfig:
    """``conf/system/kto.yaml``: KTO's settings (TRL 1.16's names and defaults).

    Attributes:
        kind: ``kto``.
        beta: the implicit reward's scale, > 0 (the paper: 0.1 for most models).
        desirable_weight: lambda_D >= 0, the desirable completions' loss weight.
        undesirable_weight: lambda_U >= 0; the paper asks lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    """

    kind: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key."""
        rules = [(key, getattr(self, key), ok, rule) for key, ok, rule in (
            ("beta", self.beta > 0, "> 0"),
            ("desirable_weight", self.desirable_weight >= 0, ">= 0"),
            ("undesirable_weight", self.undesirable_weight >= 0, ">= 0"),
        )]  # fmt: skip
        refuse(rules, None, prefix="system.")


class KTOModule(PairSystem):
    """A policy trained with KTO's loss on labelled completions.

    The KL reference point z_ref is the batch mean of the mismatched completions' log-ratios (no
    gradient), averaged over the ranks as TRL 1.16 does, so every rank's loss uses the same z.
    Metrics: ``kto/kl`` (z_ref), ``kto/accuracy`` (the completions whose reward sits on their label's
    side of z), ``kto/margin`` (the signed distance), ``rewards/desirable`` and
    ``rewards/undesirable`` (means of beta * log-ratio over each kind in the micro-batch of every rank;
    0 where there are none),
    ``kto/desirable`` (the fraction of desirable completions), and DPO's log-prob and KL metrics of
    the completions.
    """

    bar = ("loss", "kto/accuracy")

    def __init__(self, policy: nn.Module, reference: Reference, config: KTOConfig, optim: OptimConfig,
                 fsdp_block: str | None = None, guard: GuardConfig | None = None) -> None:  # fmt: skip
        super().__init__(policy, reference, optim, fsdp_block, guard)
        self.config = config

    def over_ranks(self, t: Tensor, op: str) -> Tensor:
        """``t`` reduced over the ranks (``mean`` or ``sum``; itself on one rank, or outside a trainer)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        return trainer.strategy.reduce(t, reduce_op=op)

    def kind_means(self, reward: Tensor, desirable: Tensor) -> tuple[Tensor, Tensor]:
        """Mean reward of the desirable and of the undesirable completions over every rank's micro-batch
        (0 where there are none): sums and counts reduced over the ranks, so DDP gives one process's."""
        kinds = torch.stack([desirable, ~desirable]).to(reward.dtype)  # (2, B)
        sums = self.over_ranks(torch.cat([kinds @ reward, kinds.sum(1)]), "sum")  # (4,) two sums, two counts
        means = sums[:2] / sums[2:].clamp(min=1)
        return means[0], means[1]

    def shared_step(self, batch: ScoredBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy forward, reference forward without grad, z_ref, KTO's loss, metrics."""
        if "kto_label" not in batch:
            raise ValueError("system=kto needs KTO's rows (labelled completions with their mismatched ones)")
        policy, logits = score_pairs(self.policy, batch)
        with torch.no_grad():
            reference = self.reference.score(batch, self.policy, against=logits.detach())
        z = self.over_ranks(kto_reference_point(policy, reference), "mean")
        desirable = batch["kto_label"].to(policy.chosen.device)
        c = self.config
        out = kto_loss(policy, reference, desirable, z, beta=c.beta, desirable_weight=c.desirable_weight,
                       undesirable_weight=c.undesirable_weight)  # fmt: skip
        loss = out.losses.mean()
        reward = torch.where(desirable, out.chosen_rewards, out.rejected_rewards)  # beta * log-ratio
        signed = torch.where(desirable, reward - c.beta * z, c.beta * z - reward)
        desirable_mean, undesirable_mean = self.kind_means(reward, desirable)
        metrics = {
            f"{stage}/loss": loss.detach(),
            f"{stage}/kto/kl": z,
            f"{stage}/kto/accuracy": (signed > 0).float().mean(),
            f"{stage}/kto/margin": signed.mean(),
            f"{stage}/kto/desirable": desirable.float().mean(),
            f"{stage}/rewards/desirable": desirable_mean,
            f"{stage}/rewards/undesirable": undesirable_mean,
            f"{stage}/logps/chosen": policy.chosen.detach().mean(),
            f"{stage}/logps_per_token/chosen": policy.chosen_mean.detach().mean(),
            f"{stage}/length/chosen": policy.chosen_tokens.mean(),
        }
        if reference.chosen_kl is not None:
            metrics[f"{stage}/kl/chosen"] = reference.chosen_kl.mean()
            metrics[f"{stage}/kl/chosen_per_token"] = (reference.chosen_kl / policy.chosen_tokens.clamp(min=1)).mean()
        return loss, metrics


def build(cfg: DictConfig, start: Any, tokenizer: Any) -> KTOModule:
    """The policy, its frozen reference and KTO's settings."""
    policy, reference = build_policy_and_reference(cfg, start, tokenizer, needs_reference=True)
    return KTOModule(policy, reference, typed(cfg.system, KTOConfig), optim_config(cfg, start),
                     fsdp_block=start.model.fsdp_block, guard=guard_config(cfg))  # fmt: skip


def check(cfg: DictConfig) -> None:
    """A micro-batch of at least 2 rows: z_ref needs another row's completion."""
    if cfg.data.micro_batch_size < 2:
        raise ConfigError(f"system=kto estimates its KL reference point from the other completions of a micro-batch: "
                          f"data.micro_batch_size={cfg.data.micro_batch_size} must be >= 2")  # fmt: skip


def describe(cfg: DictConfig) -> str:
    s = cfg.system
    return (f"system=kto(beta={s.beta}, desirable_weight={s.desirable_weight}, "
            f"undesirable_weight={s.undesirable_weight})")  # fmt: skip


def family(cfg: dict[str, Any]) -> tuple[str, str]:
    """``KTO``, labelled by beta."""
    return "KTO", f"KTO b={cfg['system']['beta']:g}"


SPEC = SystemSpec(KTOConfig, build, uses_loss=False, data="unpaired", samples=True, references=("copy", "lora"),
                  check=check, describe=describe, family=family,
                  sequences_per_example=lambda cfg: 2)  # fmt: skip
