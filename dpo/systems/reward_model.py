"""The reward-model training system: RLHF's first stage, a Bradley-Terry classifier of preference pairs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dpo.config.settings import ConfigError, typed
from dpo.data.batch import PreferenceBatch
from dpo.models.forward import attention_for
from dpo.rewards.learned import head_of, last_token_scores, load_reward_model
from dpo.systems.assemble import guard_config, optim_config
from dpo.systems.base import GuardConfig, OptimConfig, System
from dpo.systems.spec import SystemSpec


@dataclass
class RewardModelConfig:
    """``conf/system/reward_model.yaml``: train a reward model on the data's pairs (``conf/loss`` unused).

    Attributes:
        kind: ``reward_model``.
        center_weight: weight of ``mean((r_chosen + r_rejected)^2)`` added to the loss, which keeps
            scores near 0 without changing their differences (Eisenstein et al. 2023, arXiv
            2312.09244); 0 (default) is the plain Bradley-Terry loss of the paper's baseline.
    """

    kind: str = "reward_model"
    center_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.center_weight < 0:
            raise ValueError(f"system.center_weight={self.center_weight} must be >= 0")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """(B,) scores to (B,) losses ``-log sigmoid(r(x, y_w) - r(x, y_l))`` (DPO paper, eq. 2;
    Ouyang et al. 2022, arXiv 2203.02155, eq. 1)."""
    return -F.logsigmoid(chosen - rejected)


class RewardModelModule(System):
    """A reward model trained with the Bradley-Terry loss on (prompt, chosen, rejected) pairs.

    The model is a one-label sequence classifier (:mod:`dpo.rewards.learned`) read at each
    response's last real token (its EOS). Batches come in the ``separate`` layout: rows
    ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``, each prompt + response + EOS.

    Metrics: ``{stage}/rm/loss``, ``accuracy`` (chosen scored above rejected), ``margin``,
    ``chosen``, ``rejected`` (mean scores); ``{stage}/loss`` too, for the progress bar and sweeps.

    Args:
        model: the sequence classifier to train (``self.policy``; exported as an
            ``AutoModelForSequenceClassification``).
        optim: optimizer and schedule.
        center_weight: see :class:`RewardModelConfig`.
        guard: what a non-finite loss or gradient does.
        fsdp_block: the decoder block class FSDP2 shards as one unit (None: the model's ``_no_split_modules``).
    """

    def __init__(
        self, model: nn.Module, optim: OptimConfig, center_weight: float = 0.0, guard: GuardConfig | None = None,
        fsdp_block: str | None = None,
    ) -> None:
        super().__init__(optim, guard)
        # Under the name every system's checkpoint, resume check and export use for the trained model.
        self.policy = model
        self.center_weight = center_weight
        self.fsdp_block = fsdp_block

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.policy.parameters() if p.requires_grad)

    def shard_roots(self, model: nn.Module) -> list[nn.Module]:
        """Trunk and head are called one by one (:func:`last_token_scores`): each its own FSDP2 unit."""
        return [model.base_model, head_of(model), model]

    def shared_step(self, batch: PreferenceBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        n = batch["n_pairs"]
        if batch["attention_mask"].dim() != 2 or len(batch["input_ids"]) != 2 * n:
            raise ValueError("the reward model trains on the separate layout (2B rows); set data.layout=separate")
        scores = last_token_scores(self.policy, batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores[:n], scores[n:]  # [chosen; rejected], as the layout stacks them
        losses = bradley_terry_loss(chosen, rejected)
        loss = losses.mean()
        if self.center_weight:
            loss = loss + self.center_weight * ((chosen + rejected) ** 2).mean()
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            f"{stage}/loss": loss.detach(),
            f"{stage}/rm/loss": losses.detach().mean(),
            f"{stage}/rm/accuracy": (c > r).float().mean(),
            f"{stage}/rm/margin": (c - r).mean(),
            f"{stage}/rm/chosen": c.mean(),
            f"{stage}/rm/rejected": r.mean(),
        }
        return loss, metrics

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "train")
        self.watch_step(loss, batch["rows"])
        self.log_metrics(metrics, "train", batch["n_pairs"], bar=("loss", "rm/accuracy"))
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "val")
        counted = 0 if bool((batch["rows"] < 0).all()) else batch["n_pairs"]
        self.log_metrics(metrics, "val", counted, bar=("loss", "rm/accuracy"))
        return loss


def build(cfg: DictConfig, start: Any, tokenizer: Any) -> RewardModelModule:
    """The reward-model system: the model with a one-label classification head."""
    model = load_reward_model(start.model, tokenizer=tokenizer, attn_implementation=attention_for(start.plan.layout))
    system = typed(cfg.system, RewardModelConfig)
    return RewardModelModule(model, optim_config(cfg, start), system.center_weight, guard=guard_config(cfg),
                             fsdp_block=start.model.fsdp_block)  # fmt: skip


def check(cfg: DictConfig) -> None:
    if cfg.data.layout not in ("auto", "separate"):
        raise ConfigError(f"system=reward_model scores whole rows: use data.layout=separate, not {cfg.data.layout}")


SPEC = SystemSpec(RewardModelConfig, build, uses_loss=False, data="pairs", samples=False, references=(), check=check,
                  classifier=True)  # fmt: skip
