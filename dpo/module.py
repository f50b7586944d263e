"""The Lightning system: a trainable policy and a frozen reference, trained with a preference loss."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from dpo.callbacks import optimizer_step_ended_every
from dpo.data.collate import ScoredBatch
from dpo.logprobs import SequenceLogps, scored_kl, scored_logits, scored_logps
from dpo.losses import PairLogps, compute_loss, get_loss
from dpo.reference import sync_reference

REFERENCE_PREFIX = "reference."

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Mid-epoch resume is exact: GlobalBatchSampler skips the trained micro-batches (tests/test_scale.py).
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def warmup_schedule(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then ``decay``.

    ``constant`` keeps 1 after warmup (the paper: RMSprop, 150 warmup steps); ``linear`` and
    ``cosine`` decay to 0 at ``total_steps``. Step 0 already gets ``1 / (warmup_steps + 1)``, as in
    the official DPO repo, so the first update is never a no-op.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.decay must be constant, linear or cosine, got {decay!r}")


class DPOModule(LightningModule):
    """Policy plus frozen reference trained with a registered loss from :mod:`dpo.losses`.

    The reference starts from the same weights as the policy, stays in eval mode with no grad,
    is left out of the optimizer and out of checkpoints. Losses that need no reference
    (``LossSpec.needs_reference`` False) are run with ``reference=None``, and none is ever built.
    Where the reference's log-probs come from is ``reference_kind`` (see :mod:`dpo.reference`):
    the ``reference`` module (``copy``), the policy with its LoRA adapter off (``lora``), or the
    batch's ``ref_logps`` (``precomputed``).

    Args:
        policy: the causal LM to train.
        reference: the frozen reference, or None for a reference-free loss.
        loss: registered loss name.
        loss_params: the loss's hyperparameters (e.g. ``{"beta": 0.1}``).
        nll_weight: weight of the chosen-response NLL term added to the loss (RPO); 0 disables it.
        optimizer: Hydra config of the optimizer, ``_partial_: true``, called with the parameters.
        warmup_steps: linear warmup steps of the learning rate.
        decay: schedule after warmup (``constant``, ``linear``, ``cosine``).
        reference_kind: ``copy``, ``lora``, ``precomputed`` or ``none``.
        sync_every: TR-DPO reference update period in optimizer steps; 0 keeps it frozen.
        sync_alpha: TR-DPO mixing weight (1: hard copy).
        fsdp_block: class name of the decoder block FSDP shards as one unit (None: the model's
            ``_no_split_modules``).
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        loss: str,
        loss_params: dict[str, Any],
        optimizer: dict[str, Any],
        nll_weight: float = 0.0,
        warmup_steps: int = 0,
        decay: str = "constant",
        reference_kind: str = "copy",
        sync_every: int = 0,
        sync_alpha: float = 1.0,
        fsdp_block: str | None = None,
    ) -> None:
        super().__init__()
        spec = get_loss(loss)
        if not spec.needs_reference and reference is not None:
            raise ValueError(f"loss {loss!r} uses no reference model; don't build one")
        if spec.needs_reference:
            if reference_kind == "copy" and reference is None:
                raise ValueError(f"loss {loss!r} needs a reference model")
            if reference_kind == "lora" and not hasattr(policy, "disable_adapter"):
                raise ValueError("reference=lora needs a PEFT policy (its adapter is switched off for the reference)")
            if reference_kind not in ("copy", "lora", "precomputed"):
                raise ValueError(f"loss {loss!r} needs a reference; reference_kind={reference_kind!r}")
        self.save_hyperparameters(ignore=["policy", "reference"])
        self.uses_reference = spec.needs_reference
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.sharded = False
        self._pending: list[dict[str, Tensor]] = []  # metrics of the micro-batches of one optimizer step
        self.loss_name = loss
        self.loss_params = dict(loss_params)
        self.pairs = spec.needs_pairs

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``), shard policy and reference block by block.

        Each decoder block is one ``fully_shard`` unit, then the whole model; the reference is
        sharded the same way (it is frozen, so it holds no gradients or optimizer state).
        Lightning may call this once per stage; it shards once.
        """
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        for model in (self.policy, self.reference):
            if model is None:
                continue
            blocks = {self.hparams.fsdp_block} if self.hparams.fsdp_block else set(model._no_split_modules or ())
            if not blocks:
                raise ValueError("set model.fsdp_block: this model names no block class to shard")
            units = [m for m in model.modules() if type(m).__name__ in blocks]
            if not units:
                raise ValueError(f"model.fsdp_block {sorted(blocks)} matches no module of {type(model).__name__}")
            for unit in units:
                fully_shard(unit, mesh=mesh["data_parallel"])
            fully_shard(model, mesh=mesh["data_parallel"])
        self.sharded = True

    def train(self, mode: bool = True) -> DPOModule:
        """Switch the policy's mode; the reference stays in eval mode always."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def score(self, model: nn.Module, batch: ScoredBatch) -> tuple[PairLogps, Tensor]:
        """Summed response log-probs of ``model`` and the logits they came from, (N, S, V).

        The logits exist only at the scored (response) positions, in every layout: pair rows
        (:mod:`dpo.data.packing`) or ``[chosen; rejected]`` rows (:func:`dpo.data.collate.collate`);
        the batch's ``score_pair`` sums them per pair. SFT batches hold chosen rows only, and the
        rejected fields are empty.
        """
        logits = scored_logits(model, batch)
        chosen, rejected = scored_logps(logits, batch)
        if not self.pairs:
            rejected = SequenceLogps(*(x[:0] for x in rejected))
        return PairLogps(chosen.sum, rejected.sum, chosen.n_tokens, rejected.n_tokens, rejected.unlikely), logits

    def _reference_score(self, batch: ScoredBatch, policy: PairLogps) -> tuple[PairLogps, Tensor | None]:
        """The reference's log-probs: precomputed in the batch, the frozen copy, or LoRA's base."""
        if "ref_logps" in batch:  # precomputed for the same rows and response tokens
            ref = batch["ref_logps"]  # (2B,) [chosen; rejected]
            b = policy.chosen.shape[0]
            return PairLogps(ref[:b], ref[b:], policy.chosen_tokens, policy.rejected_tokens), None
        if self.reference is not None:
            return self.score(self.reference, batch)
        if self.hparams.reference_kind == "lora":
            with self.policy.disable_adapter():
                return self.score(self.policy, batch)
        raise RuntimeError("reference=precomputed but the batch carries no ref_logps")

    def reference_logits_fn(self) -> Any:
        """``(input_ids, attention_mask) -> logits`` of the live reference, or None when there is none."""
        if self.reference is not None:
            return lambda ids, mask: self.reference(input_ids=ids, attention_mask=mask).logits
        if self.hparams.reference_kind == "lora":

            def base(ids: Tensor, mask: Tensor) -> Tensor:
                with self.policy.disable_adapter():
                    return self.policy(input_ids=ids, attention_mask=mask).logits

            return base
        return None

    def shared_step(self, batch: ScoredBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy forward, reference forward without grad, loss, metrics.

        Returns:
            The mean loss over the batch's pairs and the metrics named ``{stage}/{group}/{name}``.
        """
        policy, policy_logits = self.score(self.policy, batch)
        reference = reference_logits = None
        if self.uses_reference:
            with torch.no_grad():
                reference, reference_logits = self._reference_score(batch, policy)
        out = compute_loss(self.loss_name, policy, reference, self.loss_params, self.hparams.nll_weight)
        loss = out.losses.mean()

        metrics = {
            f"{stage}/loss": loss.detach(),
            f"{stage}/logps/chosen": policy.chosen.detach().mean(),
            f"{stage}/logps_per_token/chosen": policy.chosen_mean.detach().mean(),
            f"{stage}/length/chosen": policy.chosen_tokens.mean(),
        }
        if self.pairs:
            metrics |= {
                f"{stage}/logps/rejected": policy.rejected.detach().mean(),
                f"{stage}/logps_per_token/rejected": policy.rejected_mean.detach().mean(),
                f"{stage}/length/rejected": policy.rejected_tokens.mean(),
                f"{stage}/rewards/chosen": out.chosen_rewards.mean(),
                f"{stage}/rewards/rejected": out.rejected_rewards.mean(),
                f"{stage}/rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
                f"{stage}/rewards/margin": (out.chosen_rewards - out.rejected_rewards).mean(),
            }
        if reference_logits is not None:
            # KL(policy || reference) of next-token distributions along the chosen responses.
            kl = scored_kl(policy_logits.detach(), reference_logits, batch)
            metrics[f"{stage}/kl/chosen"] = kl.mean()
            metrics[f"{stage}/kl/chosen_per_token"] = (kl / policy.chosen_tokens.clamp(min=1)).mean()
        return loss, metrics

    def _log(self, metrics: dict[str, Tensor], stage: str, batch_size: int) -> None:
        # sync_dist: under DDP a logged value is the mean over all ranks (equal micro-batches),
        # i.e. over the global batch, not rank 0's share of it.
        on_step = stage == "train"
        kwargs = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch_size, "sync_dist": True}
        bar = {f"{stage}/loss", f"{stage}/rewards/accuracy"}
        self.log_dict({k: v for k, v in metrics.items() if k in bar}, prog_bar=True, **kwargs)
        self.log_dict({k: v for k, v in metrics.items() if k not in bar}, **kwargs)

    def training_step(self, batch: ScoredBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "train")
        # With gradient accumulation, log once per optimizer step the mean over its micro-batches,
        # so a step's metrics describe the whole global batch (the sampler gives equal sizes).
        self._pending.append(metrics)
        if len(self._pending) == self.trainer.accumulate_grad_batches:
            mean = {k: torch.stack([m[k] for m in self._pending]).mean() for k in metrics}
            self._log(mean, "train", batch_size=batch["n_pairs"])
            self._pending = []
        return loss

    def validation_step(self, batch: ScoredBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "val")
        self._log(metrics, "val", batch_size=batch["n_pairs"])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(self.policy.parameters())
        total = self.trainer.estimated_stepping_batches if self.hparams.decay != "constant" else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_schedule(step, self.hparams.warmup_steps, int(total), self.hparams.decay),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: ScoredBatch, batch_idx: int) -> None:
        """TR-DPO: after every ``sync_every``-th optimizer step, move the reference toward the policy."""
        if self.reference is not None and optimizer_step_ended_every(self.trainer, batch_idx, self.hparams.sync_every):
            sync_reference(self.reference, self.policy, self.hparams.sync_alpha)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the reference's weights (rebuilt from the same source on resume), except when TR-DPO
        moves it, or under FSDP, whose distributed checkpoint loads the module's full state."""
        if self.hparams.sync_every or self.sharded:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the current reference's weights back so strict loading still checks the policy."""
        state = checkpoint.get("state_dict")  # absent for a distributed (FSDP) checkpoint: loaded in place
        if state is not None and self.reference is not None and not any(k.startswith(REFERENCE_PREFIX) for k in state):
            state.update({REFERENCE_PREFIX + k: v for k, v in self.reference.state_dict().items()})
