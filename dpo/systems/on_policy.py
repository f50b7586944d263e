"""What the systems that train on their own samples share (online DPO, GRPO, RLOO): manual steps,
the count of what they sampled (saved in checkpoints, reported in ``run.json``), the reward model on
the rank's device, no held-out loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dpo.systems.base import GuardConfig, OptimConfig, System


class OnPolicySystem(System):
    """A :class:`System` whose batches are prompts it samples responses for, stepping its own optimizer.

    Subclasses set ``self.policy`` and, when a model scores the samples, ``self.reward``.
    """

    def __init__(self, optim: OptimConfig, guard: GuardConfig | None = None) -> None:
        super().__init__(optim, guard)
        self.automatic_optimization = False
        self.rollouts = 0  # samples drawn to train, over all ranks
        self.reward: Any = None
        self.local_metrics: dict[str, float] = {}  # this rank's share of the last batch's metrics, before the mean

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.policy.parameters() if p.requires_grad)

    def count_samples(self, tokens: Tensor) -> None:
        """Add one batch's samples (``tokens``: (N,) each sample's length, this rank's) over every rank."""
        everyone = self.sum_over_ranks(torch.stack([tokens.sum(), torch.ones_like(tokens).sum()]))
        self.generated_tokens += int(everyone[0].item())
        self.rollouts += int(everyone[1].item())

    def on_fit_start(self) -> None:
        if hasattr(self.reward, "to"):  # a reward model scores on this rank's device
            self.reward.to(self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """No held-out loss (its batches are prompts); the held-out measure is the evaluation callback."""
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_samples"] = {"generated_tokens": self.generated_tokens, "rollouts": self.rollouts}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("dpo_samples", {})
        self.generated_tokens, self.rollouts = int(saved.get("generated_tokens", 0)), int(saved.get("rollouts", 0))
