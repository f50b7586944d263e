"""What every training system shares: the optimizer and its schedule, step bookkeeping, metric logging.

A training system is a LightningModule holding a policy (DPO now; a reward model and PPO beside
it). It subclasses :class:`System`, which owns ``conf/optim`` (:class:`OptimConfig`) and logs
metrics named ``{stage}/{group}/{name}`` as one mean per optimizer step, whatever the accumulation.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from dpo.runtime.checks import refuse


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

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key (lr=-1 was torch's traceback after the weights loaded)."""
        lr = self.optimizer.get("lr")
        lr_ok = lr is None or (not isinstance(lr, bool) and isinstance(lr, int | float) and lr > 0)
        refuse((("optimizer.lr", lr, lr_ok, "a number > 0"), ("warmup_steps", self.warmup_steps,
                self.warmup_steps >= 0, ">= 0")), prefix="optim.")  # fmt: skip


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
    """Whether batch ``batch_idx`` closed an optimizer step whose number is a multiple of ``every``,
    or, for a system that makes several steps per batch (PPO), stepped past one.

    Call from ``on_train_batch_end`` (after the step, so ``global_step`` is already counted);
    ``every=0`` never fires. With accumulation only the last micro-batch of a step counts.
    """
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    if not (every and stepped):
        return False
    module = trainer.lightning_module
    k = module.optimizer_steps_per_batch()
    step = trainer.global_step
    return step // every > (step - k) // every


class NonFinite(str, Enum):
    """What a non-finite loss or gradient does (``guard.non_finite``)."""

    stop = "stop"  # stop the run at that step; the last checkpoint stays as it was
    skip = "skip"  # drop that update (weights and optimizer state unchanged) and go on


class LowPrecision(str, Enum):
    """What pure low-precision weights with updates too small to register do (``guard.low_precision``)."""

    refuse = "refuse"  # a config error before any weights load (dpo.config.precision.check_update_precision)
    allow = "allow"  # you know better (e.g. an optimizer with stochastic rounding or Kahan sums)


class DataChanged(str, Enum):
    """What resuming a run whose tokenized data changed does (``guard.data_changed``)."""

    refuse = "refuse"  # a config error naming the split, before any weights load
    accept = "accept"  # go on with the new data; run.json keeps the old fingerprints and the step they ended


@dataclass
class GuardConfig:
    """``guard``: what training does about numbers that went wrong.

    Attributes:
        non_finite: a NaN/inf loss or gradient norm in an optimizer step: ``stop`` (name the step
            and its training rows, write nothing) or ``skip`` (drop the update, count it).
        low_precision: bf16/fp16 weights (``model.dtype``) with a learning rate so small that
            updates round away: ``refuse`` (default) or ``allow``.
        data_changed: a resumed run whose training or validation data changed since it began (its
            tokenized content's fingerprint in ``run.json``): ``refuse`` (default) or ``accept``.
    """

    non_finite: NonFinite = NonFinite.stop
    low_precision: LowPrecision = LowPrecision.refuse
    data_changed: DataChanged = DataChanged.refuse


class NonFiniteError(RuntimeError):
    """Training stopped at a non-finite loss or gradient (``guard.non_finite=stop``)."""


REFERENCE_PREFIX = "reference."  # where a system's reference model sits in its state dict


class System(LightningModule):
    """A training system: the optimizer of its trainable parameters, the non-finite guard, and metrics.

    Training metrics are logged once per optimizer step as the mean over its micro-batches (the
    sampler makes them equal in size, so they describe the whole global batch; ``sync_dist``
    averages the ranks). Validation metrics are exact means over every held-out pair of every
    rank: sums and counts are reduced over ranks at the end of the epoch, and the batches a rank
    runs only to keep pace with the others under FSDP count zero.

    Args:
        optim: the ``conf/optim`` config.
        guard: the ``guard`` config.
    """

    def __init__(self, optim: OptimConfig, guard: GuardConfig | None = None) -> None:
        super().__init__()
        self.optim = optim
        self.guard = guard or GuardConfig()
        self.skipped_steps = 0
        self._pending: list[dict[str, Tensor]] = []  # metrics of the micro-batches of one optimizer step
        self._step_rows: list[Tensor] = []  # training rows of those micro-batches
        self._step_finite = True
        self._val_sums: dict[str, Tensor] = {}
        self._val_count = 0
        self._val_bar: set[str] = set()
        self.sharded = False  # whether the models are sharded across ranks (FSDP2)
        self.fsdp_block: str | None = None  # decoder block class FSDP2 shards as one unit (None: _no_split_modules)
        self._step_started = 0.0  # perf_counter at the first micro-batch of this optimizer step
        self._step_tokens = 0  # this rank's pair tokens (ScoredBatch.n_tokens) in this optimizer step
        self._grad_norm: Tensor | None = None  # this step's gradient norm before clipping
        self.reference: Any = None  # its dpo.systems.reference.Reference, if it has one (DPO, PPO)
        self.generated_tokens = 0  # tokens it sampled to train (PPO's rollouts), over all ranks

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one global batch makes (PPO: epochs x minibatches)."""
        return 1

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates; systems narrow it (DPO: the policy alone)."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``), shard the trained model (``self.policy``) and a
        live reference (``self.reference``, if any) block by block.

        Each decoder block is one ``fully_shard`` unit, then :meth:`shard_roots` (the whole model);
        the reference is sharded the same way (it is frozen, so it holds no gradients or optimizer
        state). Lightning may call this once per stage; it shards once.
        """
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        reference = self.reference
        for model in (self.policy, *(reference.own_models() if reference is not None else ())):
            blocks = {self.fsdp_block} if self.fsdp_block else set(model._no_split_modules or ())
            if not blocks:
                raise ValueError("set model.fsdp_block: this model names no block class to shard")
            units = [m for m in model.modules() if type(m).__name__ in blocks]
            if not units:
                raise ValueError(f"model.fsdp_block {sorted(blocks)} matches no module of {type(model).__name__}")
            for unit in [*units, *self.shard_roots(model)]:
                fully_shard(unit, mesh=mesh["data_parallel"])
        self.sharded = True

    def shard_roots(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 shards after the decoder blocks, the model last: every module the system
        calls directly must be one (FSDP2 gathers a unit's parameters in its own forward hook)."""
        return [model]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.optim.optimizer, _partial_=True)(self.trainable_parameters())
        decay = self.optim.decay
        total = int(self.trainer.estimated_stepping_batches) if decay != Decay.constant else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_schedule(step, self.optim.warmup_steps, total, decay)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def watch_step(self, loss: Tensor, rows: Tensor) -> None:
        """Note a training micro-batch's loss and rows for the non-finite guard."""
        self._step_finite = self._step_finite and bool(torch.isfinite(loss.detach()).all())
        self._step_rows.append(rows.detach().cpu())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite guard (every rank agrees whether this step's loss and gradients are finite),
        and the gradient norm before clipping (Lightning clips after this hook)."""
        if self.automatic_optimization:  # a manual step (PPO) measures its norm before it clips
            self._grad_norm = self.grad_norm()
        finite = self._step_finite and all(
            bool(torch.isfinite(_local(p.grad)).all()) for p in self.trainable_parameters() if p.grad is not None
        )
        rows, self._step_rows, self._step_finite = self._step_rows, [], True
        bad = self.trainer.strategy.reduce(torch.tensor(float(not finite), device=self.device), reduce_op="max")
        if not bad.item():
            return
        step = self.trainer.global_step + 1
        mine = torch.cat(rows).tolist() if rows else []
        everyone = self.trainer.strategy.all_gather(torch.tensor(mine, device=self.device))
        rows_all = sorted({int(r) for r in everyone.reshape(-1).tolist()})
        if self.guard.non_finite == NonFinite.stop:
            raise NonFiniteError(
                f"non-finite loss or gradient at optimizer step {step} (training rows {rows_all}, indices in "
                "the training split); nothing was written over the last checkpoint. guard.non_finite=skip "
                "drops such steps instead"
            )
        optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves weights and state alone
        self.skipped_steps += 1
        self.print(f"guard: skipped optimizer step {step} (non-finite; training rows {rows_all})")

    def manual_step(self, loss: Tensor, rows: Tensor, max_grad_norm: float | None) -> Tensor:
        """One optimizer step of a system that steps itself (PPO, online DPO): the guard watches
        ``loss`` and ``rows``; backward, the norm before clipping (returned), clipping, step, schedule."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        self.watch_step(loss, rows)
        opt.zero_grad()
        self.manual_backward(loss)
        norm = self.grad_norm()
        if max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        return norm

    def grad_norm(self) -> Tensor:
        """The L2 norm of all trainable parameters' gradients, over every rank's shard (FSDP2), in fp32."""
        norms = [torch.linalg.vector_norm(_local(p.grad), dtype=torch.float32)
                 for p in self.trainable_parameters() if p.grad is not None]  # fmt: skip
        squares = torch.stack(norms).square().sum() if norms else torch.zeros((), device=self.device)
        if self.sharded:
            squares = self.trainer.strategy.reduce(squares, reduce_op="sum")
        return squares.sqrt()

    def health_metrics(self, tokens: int, seconds: float) -> dict[str, Tensor]:
        """``train/tokens_per_s`` (every rank's ``tokens`` over this rank's ``seconds``) and
        ``train/peak_memory_mb`` (the largest over ranks: CUDA's ``max_memory_allocated`` since
        the last call on GPUs, the process's peak resident memory so far on CPUs); same on every rank."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        mine = torch.tensor([float(tokens), peak], device=self.device)
        every = self.trainer.strategy.all_gather(mine).reshape(-1, 2) if self.trainer.world_size > 1 else mine[None]
        return {
            "train/tokens_per_s": every[:, 0].sum() / max(seconds, 1e-9),
            "train/peak_memory_mb": every[:, 1].max(),
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._step_started, self._step_tokens = time.perf_counter(), 0
        if isinstance(batch, dict):
            self._step_tokens += int(batch.get("n_tokens", 0))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Per optimizer step: ``train/grad_norm`` (before clipping), ``train/tokens_per_s`` (the
        step's pair tokens, :attr:`dpo.data.batch.ScoredBatch.n_tokens`, summed over ranks and
        micro-batches, per second from its first micro-batch's start to its last one's end, the
        optimizer update included) and ``train/peak_memory_mb``. Manual steps (PPO) log their own."""
        if not self.automatic_optimization or (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        metrics = self.health_metrics(self._step_tokens, time.perf_counter() - self._step_started)
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def log_metrics(self, metrics: dict[str, Tensor], stage: str, batch_size: int, bar: tuple[str, ...] = ()) -> None:
        """Log ``{stage}/...`` metrics (see the class docstring); ``bar`` names go to the progress bar."""
        if stage != "train":
            for key, value in metrics.items():
                self._val_sums[key] = self._val_sums.get(key, 0) + value.detach().float() * batch_size
            self._val_count += batch_size
            self._val_bar = {f"{stage}/{name}" for name in bar}
            return
        self._pending.append(metrics)
        if len(self._pending) < self.trainer.accumulate_grad_batches:
            return
        metrics = {k: torch.stack([m[k] for m in self._pending]).mean() for k in metrics}
        self._pending = []
        kwargs = {"on_step": True, "on_epoch": False, "batch_size": batch_size, "sync_dist": True}
        shown = {f"{stage}/{name}" for name in bar}
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True, **kwargs)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, **kwargs)

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over every rank (itself on one)."""
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def global_moments(self, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and count of the masked ``values`` over every rank's rows (e.g. advantages
        to whiten, scores to normalise), in one reduction."""
        stats = torch.stack([(values * mask).sum(), (values**2 * mask).sum(), mask.sum()])
        trainer = self._trainer  # None outside a Trainer (a rollout on its own)
        if trainer is not None and trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2].clamp(min=1)
        return mean, (stats[1] / stats[2].clamp(min=1) - mean**2).clamp(min=0), stats[2]

    def log_at_step(self, metrics: dict[str, Tensor], bar: tuple[str, ...]) -> None:
        """Log the metrics of a batch that made several optimizer steps (PPO's iteration), averaged
        over ranks (equal rows each), at the optimizer step.

        Lightning's ``self.log`` stamps metrics with the number of batches that stepped, which for
        such a system counts batches, not optimizer steps; the loggers get them at ``global_step - 1``
        instead, the 0-based index of the batch's last optimizer step, which is where Lightning stamps
        DPO's metrics of a step (so curves of every system share one x axis, and a resumed run's CSV
        keeps the rows its checkpoint covers: ``ResumableCSVLogger``).
        """
        keys = sorted(metrics)
        means = self.sum_over_ranks(torch.stack([metrics[k].detach().float() for k in keys])) / self.trainer.world_size
        values = dict(zip(keys, means, strict=True))
        self.log_dict({k: v for k, v in values.items() if k in bar}, prog_bar=True, logger=False)
        self.log_dict({k: v for k, v in values.items() if k not in bar}, logger=False)
        every = self.trainer.log_every_n_steps
        due = self.global_step // every > (self.global_step - self.optimizer_steps_per_batch()) // every
        if self.trainer.is_global_zero and due:  # this batch stepped past a multiple of log_every_n_steps
            for logger in self.trainer.loggers:  # stamped as Lightning stamps DPO's: the last step's 0-based index
                logger.log_metrics({k: float(v) for k, v in values.items()}, step=self.global_step - 1)
                logger.save()  # as Lightning does after each log: a killed run keeps its rows

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_count = {}, 0

    def on_validation_epoch_end(self) -> None:
        """Exact means over all ranks' held-out pairs: reduce sums and counts, then divide."""
        keys = sorted(self._val_sums)
        if not keys:
            return
        sums = torch.stack([self._val_sums[k] for k in keys] + [torch.tensor(float(self._val_count))]).to(self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = {k: sums[i] / sums[-1] for i, k in enumerate(keys)}
        shown = self._val_bar
        self.log_dict({k: v for k, v in means.items() if k in shown}, prog_bar=True, sync_dist=False)
        self.log_dict({k: v for k, v in means.items() if k not in shown}, sync_dist=False)

    def report(self) -> list[str]:
        """A summary line when the guard skipped steps."""
        return [f"guard: skipped {self.skipped_steps} optimizer step(s) with a non-finite loss or gradient"] * bool(
            self.skipped_steps
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A system's reference (DPO, PPO) prunes what need not be saved; a distributed (FSDP)
        checkpoint keeps all."""
        checkpoint["dpo_skipped_steps"] = self.skipped_steps
        reference = self.reference
        if reference is not None and not self.sharded:
            reference.prune_checkpoint(checkpoint["state_dict"], REFERENCE_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("dpo_skipped_steps", 0))
        reference = self.reference
        state = checkpoint.get("state_dict")  # absent for a distributed (FSDP) checkpoint: loaded in place
        if reference is not None and state is not None:
            reference.restore_checkpoint(state, REFERENCE_PREFIX)


def _local(t: Tensor) -> Tensor:
    """A tensor's local shard (FSDP2 gradients are DTensors; each rank checks its own part)."""
    return t.to_local() if hasattr(t, "to_local") else t
