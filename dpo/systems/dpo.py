"""The DPO training system: a trainable policy and its reference, trained with a preference loss."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dpo.data.batch import ScoredBatch
from dpo.maths.losses import MODIFIERS, Loss
from dpo.models.forward import score_pairs
from dpo.systems.assemble import build_policy_and_reference, guard_config, optim_config
from dpo.systems.base import GuardConfig, OptimConfig, System, optimizer_step_ended
from dpo.systems.reference import NoReference, Reference
from dpo.systems.spec import SystemSpec

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Mid-epoch resume is exact: GlobalBatchSampler skips the trained micro-batches (tests/test_scale.py).
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


@dataclass
class DPOSystemConfig:
    """``conf/system/dpo.yaml``: a policy trained with the ``conf/loss`` choice (the default system).

    Attributes:
        kind: ``dpo``.
    """

    kind: str = "dpo"


class PairSystem(System):
    """A policy trained on scored batches of pairs (:mod:`dpo.data.batch`) against a :class:`Reference`:
    the Lightning hooks DPO and KTO share; each defines :meth:`shared_step`.

    The reference (:mod:`dpo.systems.reference`) decides where reference log-probs come from, what of it
    a checkpoint holds and how TR-DPO moves it; this module only asks. It is a registered
    submodule, so it follows the policy's device and FSDP sharding, but it is out of the optimizer.

    Args:
        policy: the causal LM to train.
        reference: where the reference's log-probs come from.
        optim: optimizer and schedule (``conf/optim``).
        fsdp_block: class name of the decoder block FSDP shards as one unit (None: the model's
            ``_no_split_modules``).
        guard: what a non-finite loss or gradient does (``conf``: ``guard``).
    """

    bar: tuple[str, ...] = ("loss", "rewards/accuracy")
    """Metrics shown on the progress bar."""

    def __init__(self, policy: nn.Module, reference: Reference, optim: OptimConfig, fsdp_block: str | None = None,
                 guard: GuardConfig | None = None) -> None:  # fmt: skip
        super().__init__(optim, guard)
        self.policy = policy
        self.reference = reference
        self.fsdp_block = fsdp_block

    def shared_step(self, batch: ScoredBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's mean loss and its metrics named ``{stage}/{group}/{name}``."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.policy.parameters() if p.requires_grad)

    def training_step(self, batch: ScoredBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "train")
        self.watch_step(loss, batch["rows"])
        self.log_metrics(metrics, "train", batch["n_pairs"], bar=self.bar)
        return loss

    def validation_step(self, batch: ScoredBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch, "val")
        # A batch of rows -1 only keeps this rank in step with the others (FSDP): it counts zero.
        counted = 0 if bool((batch["rows"] < 0).all()) else batch["n_pairs"]
        self.log_metrics(metrics, "val", counted, bar=self.bar)
        return loss

    def on_predict_start(self) -> None:
        self.reference.on_predict_start(self.trainer)

    @torch.no_grad()
    def predict_step(self, batch: ScoredBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The policy's summed log-probs of a batch of pairs, with their rows: the reference pass of
        ``reference=precomputed``, run before training (so the policy is still the initial model)."""
        logps, _ = score_pairs(self.policy, batch)
        return {"rows": batch["rows"].cpu(), "logps": torch.stack([logps.chosen, logps.rejected], 1).float().cpu()}

    def on_train_batch_end(self, outputs: Any, batch: ScoredBatch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if optimizer_step_ended(self.trainer, batch_idx):
            self.reference.after_optimizer_step(self.policy, self.trainer.global_step)


class DPOModule(PairSystem):
    """A policy trained with a registered loss from :mod:`dpo.maths.losses` against a :class:`Reference`.

    A loss that needs no reference (``Loss.needs_reference`` False) runs with
    :class:`~dpo.systems.reference.NoReference`.

    Args:
        policy: the causal LM to train.
        reference: where the reference's log-probs come from.
        loss: registered loss name (or ``mix``).
        loss_params: the loss's hyperparameters (e.g. ``{"beta": 0.1}``) and modifiers.
        optim: optimizer and schedule (``conf/optim``).
        nll_weight: weight of the chosen-response NLL added to the loss (RPO); 0 disables it.
        fsdp_block, guard: as :class:`PairSystem`.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: Reference,
        loss: str,
        loss_params: dict[str, Any],
        optim: OptimConfig,
        nll_weight: float = 0.0,
        fsdp_block: str | None = None,
        guard: GuardConfig | None = None,
    ) -> None:
        super().__init__(policy, reference, optim, fsdp_block, guard)
        self.loss = Loss.of(loss, loss_params, nll_weight)
        if self.loss.needs_reference and isinstance(reference, NoReference):
            raise ValueError(f"loss {loss!r} needs a reference model")
        self.loss_name = loss

    def shared_step(self, batch: ScoredBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy forward, reference forward without grad, loss, metrics.

        Returns:
            The mean loss over the batch's pairs and the metrics named ``{stage}/{group}/{name}``.
        """
        spec = self.loss
        policy, policy_logits = score_pairs(self.policy, batch, pairs=spec.needs_pairs,
                                            unlikelihood=spec.needs_unlikelihood, tails=spec.needs_tails, wpo=spec.wpo)
        reference = None
        if spec.needs_reference:
            with torch.no_grad():
                against = policy_logits.detach()  # the reference's pass also measures the KL to the policy
                reference = self.reference.score(batch, self.policy, against=against, tails=spec.needs_tails)
        out = spec(policy, reference)
        loss = out.losses.mean()

        metrics = {
            f"{stage}/loss": loss.detach(),
            f"{stage}/logps/chosen": policy.chosen.detach().mean(),
            f"{stage}/logps_per_token/chosen": policy.chosen_mean.detach().mean(),
            f"{stage}/length/chosen": policy.chosen_tokens.mean(),
        }
        if spec.needs_pairs:
            metrics |= {
                f"{stage}/logps/rejected": policy.rejected.detach().mean(),
                f"{stage}/logps_per_token/rejected": policy.rejected_mean.detach().mean(),
                f"{stage}/length/rejected": policy.rejected_tokens.mean(),
                f"{stage}/rewards/chosen": out.chosen_rewards.mean(),
                f"{stage}/rewards/rejected": out.rejected_rewards.mean(),
                f"{stage}/rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
                f"{stage}/rewards/margin": (out.chosen_rewards - out.rejected_rewards).mean(),
            }
        if reference is not None and reference.chosen_kl is not None:
            # KL(policy || reference) of next-token distributions along the chosen responses.
            kl = reference.chosen_kl
            metrics[f"{stage}/kl/chosen"] = kl.mean()
            metrics[f"{stage}/kl/chosen_per_token"] = (kl / policy.chosen_tokens.clamp(min=1)).mean()
        return loss, metrics

def loss_params(cfg: DictConfig) -> dict[str, Any]:
    """The loss's hyperparameters: every key of ``cfg.loss`` except ``name`` and ``nll_weight``."""
    return {k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k not in ("name", "nll_weight")}


def run_loss(cfg: DictConfig) -> Loss:
    """The run's :class:`~dpo.maths.losses.Loss` (``conf/loss``); ``ValueError`` naming every wrong key."""
    return Loss.of(cfg.loss.name, loss_params(cfg), cfg.loss.nll_weight)


def build(cfg: DictConfig, start: Any, tokenizer: Any) -> DPOModule:
    """The DPO system: the policy, its reference and the ``conf/loss`` choice."""
    policy, reference = build_policy_and_reference(cfg, start, tokenizer, needs_reference=run_loss(cfg).needs_reference)
    return DPOModule(
        policy, reference, cfg.loss.name, loss_params(cfg), optim_config(cfg, start),
        nll_weight=cfg.loss.nll_weight, fsdp_block=start.model.fsdp_block, guard=guard_config(cfg),
    )  # fmt: skip


def describe(cfg: DictConfig) -> str:
    params = ", ".join(f"{k}={v}" for k, v in loss_params(cfg).items() if MODIFIERS.get(k, object()) != v)
    return f"loss={cfg.loss.name}({params})"


def family(cfg: dict[str, Any]) -> tuple[str, str]:
    """(family, label) of a run: its loss, in the paper's names where it has one; a modifier away from
    its default (an f-divergence, LD-DPO, WPO, RPO's NLL term) makes a family of its own."""
    loss = cfg["loss"]
    name = loss["name"]
    changed = " ".join(f"{k}={v}" for k, v in loss.items()
                       if (k in MODIFIERS and v != MODIFIERS[k]) or (k == "nll_weight" and v))  # fmt: skip
    if not changed and name == "sft":
        return "Preferred-FT", "Preferred-FT"
    if not changed and name == "unlikelihood":
        return "Unlikelihood", f"Unlikelihood a={loss['alpha']:g}"
    if not changed and name == "dpo":
        return "DPO", f"DPO b={loss['beta']:g}"
    kind = f"{name} {changed}".strip()
    params = " ".join(f"{k}={v}" for k, v in loss.items() if k not in ("name", "nll_weight", *MODIFIERS))
    return kind, f"{kind} {params}".strip()


SPEC = SystemSpec(DPOSystemConfig, build, uses_loss=True, data=None, samples=True, references=None,
                  describe=describe, family=family)  # fmt: skip
