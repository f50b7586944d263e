"""The reference model: one object per way of getting the frozen reference's log-probs.

``conf/reference/<kind>.yaml`` picks one (its schema is the kind's ``Config`` below):

* ``copy`` (:class:`FrozenCopy`): a frozen deep copy of the initial policy. With ``sync_every > 0``
  it follows the policy as in TR-DPO (arXiv 2404.09656): ``ref <- alpha * policy + (1 - alpha) * ref``.
* ``lora`` (:class:`LoraReference`): the policy is base + LoRA adapter; the reference is the base
  with the adapter switched off, so one copy of the weights is in memory.
* ``precomputed`` (:class:`PrecomputedReference`): one pass of the initial policy over train and
  val before training; the summed log-probs are cached on disk and served in the batches, so no
  reference runs during training. It cannot score sequences sampled during training.
* ``none`` (:class:`NoReference`): for losses that need no reference.

A training system asks its reference for log-probs of preference pairs (:meth:`Reference.score`)
or for logits of any sequences, e.g. sampled ones (:meth:`Reference.logits`), and tells it when an
optimizer step ended; the reference decides what of it goes into a checkpoint. Every reference is
an ``nn.Module`` registered under the system, so device moves, FSDP sharding and checkpoint keys
(``reference.*``) follow the system.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from filelock import FileLock
from torch import Tensor, nn

from dpo.data import cache
from dpo.data.batch import ScoredBatch
from dpo.maths.logprobs import PairLogps, response_lengths
from dpo.maths.tiled import HeadInputs
from dpo.models.forward import score_pairs
from dpo.runtime.checks import refuse
from dpo.runtime.io import atomic_write
from dpo.runtime.log import get_logger

log = get_logger(__name__)


class ReferenceUnavailable(RuntimeError):
    """Asked a reference for something its kind cannot give (e.g. precomputed log-probs of new samples)."""


class Reference(nn.Module):
    """How reference log-probs are obtained; one subclass per ``reference.kind``.

    Attributes:
        kind: the config name.
        runs_sequences: whether :meth:`logits` works on arbitrary (e.g. freshly sampled) sequences.
    """

    kind: ClassVar[str]
    runs_sequences: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.training = False  # eval from the start: Lightning records and restores each module's mode

    def score(self, batch: ScoredBatch, policy: nn.Module, against: Tensor | HeadInputs | None = None,
              tails: bool = False) -> PairLogps:
        """The reference's summed log-probs of the batch's pairs; with ``against`` (the policy's scored
        logits or head inputs) and a model that runs, also the exact KL(policy || reference) over the
        chosen tokens (``chosen_kl``); with ``tails``, LD-DPO's split (``chosen_tail``, ``rejected_tail``).
        ``policy`` is the system's policy (LoRA's base lives in it)."""
        raise ReferenceUnavailable(f"reference={self.kind} gives no log-probs")

    def logits(self, input_ids: Tensor, attention_mask: Tensor, policy: nn.Module) -> Tensor:
        """Full next-token logits (N, T, V) of any sequences under the reference."""
        raise ReferenceUnavailable(f"reference={self.kind} cannot score sequences it has not seen before training")

    def own_models(self) -> list[nn.Module]:
        """The models this reference holds apart from the policy (FSDP shards them like the policy)."""
        return []

    def prepare(self, trainer: Any, module: Any, datamodule: Any) -> None:
        """Work before training starts, on the run's trainer (the precomputed pass); nothing for most kinds."""

    def on_predict_start(self, trainer: Any) -> None:
        """Called from the system's ``on_predict_start`` (every rank, the process group is up)."""

    def after_optimizer_step(self, policy: nn.Module, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) ended; the TR-DPO sync."""

    def prune_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Drop what a checkpoint need not hold (weights rebuilt from the same source on resume)."""

    def restore_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Undo :meth:`prune_checkpoint` on load, so strict loading still checks the policy."""

    def for_evaluation(self, policy: nn.Module) -> Reference | None:
        """The reference that sampled completions are measured against (KL), or None if there is none."""
        return self if self.runs_sequences else None

    def train(self, mode: bool = True) -> Reference:
        """A reference never leaves eval mode (no dropout, deterministic log-ratios)."""
        return super().train(False)


@dataclass
class CopyConfig:
    """``reference=copy``: a frozen copy of the initial policy (the paper's setting).

    Attributes:
        kind: ``copy``.
        sync_every: TR-DPO: move the reference toward the policy every N optimizer steps; 0 never.
        sync_alpha: TR-DPO mixing weight in (0, 1]; 1 is a hard copy (TR-DPO-tau), < 1 soft.
    """

    kind: str = "copy"
    sync_every: int = 0
    sync_alpha: float = 1.0

    def __post_init__(self) -> None:
        refuse((("sync_every", self.sync_every, self.sync_every >= 0, ">= 0 (0: never)"),
                ("sync_alpha", self.sync_alpha, not self.sync_every or 0 < self.sync_alpha <= 1, "in (0, 1]")),
               prefix="reference.")  # fmt: skip


class FrozenCopy(Reference):
    """A frozen copy of the policy's initial weights (kept frozen, or moved by TR-DPO syncs)."""

    kind = "copy"
    runs_sequences = True
    Config = CopyConfig

    def __init__(self, model: nn.Module, sync_every: int = 0, sync_alpha: float = 1.0) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.sync_every, self.sync_alpha = sync_every, sync_alpha

    @classmethod
    def of(cls, policy: nn.Module, sync_every: int = 0, sync_alpha: float = 1.0) -> FrozenCopy:
        """A reference starting from identical weights to ``policy``."""
        return cls(copy.deepcopy(policy), sync_every, sync_alpha)

    def own_models(self) -> list[nn.Module]:
        return [self.model]

    def score(self, batch: ScoredBatch, policy: nn.Module, against: Tensor | HeadInputs | None = None,
              tails: bool = False) -> PairLogps:
        return score_pairs(self.model, batch, against=against, tails=tails)[0]

    def logits(self, input_ids: Tensor, attention_mask: Tensor, policy: nn.Module) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def for_evaluation(self, policy: nn.Module) -> Reference:
        """Itself, or, when it moves (TR-DPO, iterative DPO's rounds), a frozen copy of where it
        started: the frontier's KL is to the starting policy, as for every other method. Called
        before any checkpoint is restored, so ``self.model`` still holds the starting weights."""
        return FrozenCopy.of(self.model) if self.sync_every else self

    def after_optimizer_step(self, policy: nn.Module, step: int) -> None:
        if self.sync_every and step % self.sync_every == 0:
            sync_reference(self.model, policy, self.sync_alpha)

    def prune_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        if self.sync_every:  # a moving reference is state: keep it
            return
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    def restore_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        if not any(k.startswith(prefix) for k in state_dict):
            state_dict.update({f"{prefix}model.{k}": v for k, v in self.model.state_dict().items()})


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO update ``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = 1: hard copy)."""
    for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.lerp_(pol_p.detach().to(ref_p.dtype), alpha)


@dataclass
class LoraConfig:
    """``reference=lora``: train a LoRA adapter; the reference is the base with the adapter off.

    Attributes:
        kind: ``lora``.
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: adapter dropout; keep 0 so log-ratios are deterministic.
        target_modules: module names to adapt; None: PEFT's default for the architecture.
    """

    kind: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None


class LoraReference(Reference):
    """The policy's base model with its LoRA adapter switched off; holds no weights of its own."""

    kind = "lora"
    runs_sequences = True
    Config = LoraConfig

    def score(self, batch: ScoredBatch, policy: nn.Module, against: Tensor | HeadInputs | None = None,
              tails: bool = False) -> PairLogps:
        with policy.disable_adapter():
            return score_pairs(policy, batch, against=against, tails=tails)[0]

    def logits(self, input_ids: Tensor, attention_mask: Tensor, policy: nn.Module) -> Tensor:
        with policy.disable_adapter():
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits


def apply_lora(policy: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``policy`` with a PEFT LoRA adapter; only the adapter is trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(policy, config)


@dataclass
class PrecomputedConfig:
    """``reference=precomputed``: reference log-probs of every pair computed once before training.

    Cached on disk under a fingerprint of (tokenized data, initial weights, precision) and shared by
    every job of a sweep; a stale cache is never used. KL metrics need reference logits and are not
    logged in this mode.

    Attributes:
        kind: ``precomputed``.
        batch_size: pairs per forward of the precomputation pass.
    """

    kind: str = "precomputed"
    batch_size: int = 16


class PrecomputedReference(Reference):
    """Reference log-probs served with the batches (``ref_logps``), computed by :meth:`prepare`.

    Args:
        batch_size: pairs per forward of the pass.
        cache_dir: folder of the cache files; None computes without caching.
        identity: what identifies the initial weights and precision (part of the cache key).
    """

    kind = "precomputed"
    Config = PrecomputedConfig

    def __init__(self, batch_size: int, cache_dir: str | None, identity: dict[str, Any]) -> None:
        super().__init__()
        self.batch_size, self.cache_dir, self.identity = batch_size, cache_dir, identity

    def score(self, batch: ScoredBatch, policy: nn.Module, against: Tensor | HeadInputs | None = None,
              tails: bool = False) -> PairLogps:
        if "ref_logps" not in batch:
            raise ReferenceUnavailable("reference=precomputed but the batch carries no ref_logps")
        if tails:  # the cache holds whole-response sums
            raise ReferenceUnavailable("reference=precomputed holds whole-response sums; loss.ld_alpha needs a live "
                                       "reference (reference=copy)")
        ref = batch["ref_logps"]  # (2B,) [chosen; rejected], for the same rows and response tokens
        b = batch["n_pairs"]
        return PairLogps(ref[:b], ref[b:], *response_lengths(batch))

    def prepare(self, trainer: Any, module: Any, datamodule: Any) -> None:
        """Attach the initial policy's log-probs to every split: from the cache, or computed by a
        Lightning predict pass on the run's own strategy and precision (each rank its share, a
        progress bar) and cached. Global rank 0 holds the cache's lock from the decision to the
        write, so a sweep's jobs compute once and every rank of a job agrees (the decision is
        broadcast in :meth:`on_predict_start`)."""
        self._loaders = datamodule.reference_dataloaders(self.batch_size)
        self._paths = {
            split: None if self.cache_dir is None else Path(self.cache_dir) / "ref-{}.pt".format(
                cache.fingerprint({"what": "reference_logps", "data": datamodule.cache_key(split), **self.identity}))
            for split in self._loaders
        }  # fmt: skip
        self._locks: list[FileLock] = []
        try:
            outputs = trainer.predict(module, dataloaders=list(self._loaders.values()), return_predictions=True)
            for (split, path), outs in zip(self._paths.items(), outputs, strict=True):
                n = len(datamodule.datasets[split])
                if self._hits[split]:
                    values = torch.load(path, weights_only=True)
                else:
                    values = _gather(outs, n, split)
                    if path is not None and trainer.is_global_zero:
                        atomic_write(path, lambda tmp, v=values: torch.save(v, tmp))
                datamodule.attach_reference_logps(split, values)
        finally:
            for lock in self._locks:
                lock.release()
        log.info("reference log-probs precomputed (" + ", ".join(
            f"{split}: {'cache hit' if hit else 'computed'}" for split, hit in self._hits.items()) + ")")  # fmt: skip

    def on_predict_start(self, trainer: Any) -> None:
        hits = {}
        if trainer.is_global_zero:
            for split, path in self._paths.items():
                if path is not None:
                    self._locks.append(FileLock(f"{path}.lock"))
                    self._locks[-1].acquire()
                hits[split] = path is not None and path.is_file()
        self._hits = trainer.strategy.broadcast(hits, src=0)
        for split, loader in self._loaders.items():
            loader.batch_sampler.active = not self._hits[split]  # a cache hit runs no forward


def _gather(outputs: list[dict[str, Tensor]], n: int, split: str) -> Tensor:
    """Every rank's ``{"rows", "logps"}`` predictions as one (n, 2) tensor in row order."""
    rows = torch.cat([o["rows"] for o in outputs]) if outputs else torch.zeros(0, dtype=torch.long)
    logps = torch.cat([o["logps"] for o in outputs]) if outputs else torch.zeros(0, 2)
    if dist.is_available() and dist.is_initialized():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (rows, logps))
        rows, logps = torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts])
    keep = rows >= 0  # stand-in rows keep ranks in step and count for nothing
    values = torch.full((n, 2), float("nan"))
    values[rows[keep]] = logps[keep]
    if torch.isnan(values).any():
        raise RuntimeError(f"reference pass over {split}: {int(torch.isnan(values).any(1).sum())} of {n} rows missing")
    return values


@dataclass
class NoneConfig:
    """``reference=none``: no reference model, for reference-free losses (simpo, ref_free_dpo, sft).

    Attributes:
        kind: ``none``.
    """

    kind: str = "none"


class NoReference(Reference):
    """No reference. Evaluations of sampled completions measure the KL to a frozen copy of the
    starting policy instead (:meth:`for_evaluation`), so reference-free baselines (Preferred-FT,
    Unlikelihood) land on the same reward-KL frontier as DPO."""

    kind = "none"
    Config = NoneConfig

    def for_evaluation(self, policy: nn.Module) -> Reference:
        return FrozenCopy.of(policy)


REFERENCES: dict[str, type[Reference]] = {
    cls.kind: cls for cls in (FrozenCopy, LoraReference, PrecomputedReference, NoReference)
}
"""``reference.kind`` -> its class; each class's ``Config`` is that kind's config schema."""


def build_reference(
    cfg: CopyConfig | LoraConfig | PrecomputedConfig | NoneConfig,
    policy: nn.Module,
    *,
    needs_reference: bool,
    cache_dir: str | None = None,
    identity: dict[str, Any] | None = None,
) -> tuple[nn.Module, Reference]:
    """The policy to train and its reference, as ``cfg`` (a ``conf/reference`` node) says.

    LoRA wraps the policy in an adapter whatever the loss (training only the adapter is a policy
    choice too). A loss that needs no reference gets :class:`NoReference` otherwise, and nothing
    is built or precomputed for it.

    Args:
        cfg: the reference config, as its dataclass (``OmegaConf.to_object(cfg.reference)``).
        policy: the initial policy.
        needs_reference: whether the loss uses reference log-probs.
        cache_dir: where ``precomputed`` caches its pass.
        identity: what identifies the initial weights and precision, for ``precomputed``'s cache key.
    """
    if isinstance(cfg, LoraConfig):
        return apply_lora(policy, cfg), LoraReference()
    if not needs_reference or isinstance(cfg, NoneConfig):
        return policy, NoReference()
    if isinstance(cfg, PrecomputedConfig):
        return policy, PrecomputedReference(cfg.batch_size, cache_dir, identity or {})
    return policy, FrozenCopy.of(policy, cfg.sync_every, cfg.sync_alpha)
