"""What every training system shares: the optimizer and its schedule, step bookkeeping, metric logging.

A training system is a LightningModule holding a policy (DPO now; a reward model and PPO beside
it). It subclasses :class:`System`, which owns ``conf/optim`` (:class:`OptimConfig`) and logs
metrics named ``{stage}/{group}/{name}`` as one mean per optimizer step, whatever the accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from torch import Tensor, nn


class Decay(str, Enum):
    """The learning rate after warmup: ``constant``, or ``linear``/``cosine`` to 0 at the last step."""

    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class OptimConfig:
    """``conf/optim``: the optimizer and its learning-rate schedule.

    Attributes:
        optimizer: a Hydra node with ``_target_`` (e.g. ``torch.optim.AdamW``) and ``_partial_: true``;
            it is called with the trainable parameters. Its keys are checked against the target.
        warmup_steps: linear warmup steps of the learning rate (the paper: 150).
        decay: the schedule after warmup.
    """

    optimizer: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    decay: Decay = Decay.constant


def warmup_schedule(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then ``decay``.

    ``constant`` keeps 1 after warmup (the paper: RMSprop, 150 warmup steps); ``linear`` and
    ``cosine`` decay to 0 at ``total_steps``. Step 0 already gets ``1 / (warmup_steps + 1)``, as in
    the official DPO repo, so the first update is never a no-op.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == Decay.constant:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == Decay.linear:
        return 1.0 - progress
    if decay == Decay.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.decay must be constant, linear or cosine, got {decay!r}")


def optimizer_step_ended(trainer: pl.Trainer, batch_idx: int, every: int = 1) -> bool:
    """Whether batch ``batch_idx`` closed an optimizer step whose number is a multiple of ``every``.

    Call from ``on_train_batch_end`` (after the step, so ``global_step`` is already counted);
    ``every=0`` never fires. With accumulation only the last micro-batch of a step counts.
    """
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return bool(every) and stepped and trainer.global_step % every == 0


class System(LightningModule):
    """A training system: the optimizer of its trainable parameters, and per-step metric logging.

    Args:
        optim: the ``conf/optim`` config.
    """

    def __init__(self, optim: OptimConfig) -> None:
        super().__init__()
        self.optim = optim
        self._pending: list[dict[str, Tensor]] = []  # metrics of the micro-batches of one optimizer step

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates; systems narrow it (DPO: the policy alone)."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.optim.optimizer, _partial_=True)(self.trainable_parameters())
        decay = self.optim.decay
        total = int(self.trainer.estimated_stepping_batches) if decay != Decay.constant else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_schedule(step, self.optim.warmup_steps, total, decay)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_metrics(self, metrics: dict[str, Tensor], stage: str, batch_size: int, bar: tuple[str, ...] = ()) -> None:
        """Log ``{stage}/...`` metrics: training once per optimizer step, validation per epoch.

        With gradient accumulation the training metrics of a step are the mean over its
        micro-batches (the sampler makes them equal in size), so they describe the whole global
        batch; ``sync_dist`` then averages over ranks. ``bar`` names go to the progress bar too.
        """
        if stage == "train":
            self._pending.append(metrics)
            if len(self._pending) < self.trainer.accumulate_grad_batches:
                return
            metrics = {k: torch.stack([m[k] for m in self._pending]).mean() for k in metrics}
            self._pending = []
        on_step = stage == "train"
        kwargs = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch_size, "sync_dist": True}
        shown = {f"{stage}/{name}" for name in bar}
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True, **kwargs)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, **kwargs)
