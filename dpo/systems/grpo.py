"""The GRPO training system: critic-free policy gradients with a group baseline (Shao et al. 2024,
"DeepSeekMath", arXiv 2402.03300), the machinery RLOO (:mod:`dpo.systems.rloo`) shares.

Each prompt gets ``k`` samples; a sample's advantage is its score against its group's (the
prompt's other samples'): GRPO subtracts the group mean and divides by its standard deviation,
Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) only subtracts, RLOO the mean of the other ``k - 1``.
No value head: the group is the baseline. The KL to the reference is a term of the loss (GRPO's
k3 estimator) or a penalty on the score (RLOO's k1), :mod:`dpo.maths.rl`'s functions throughout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dpo.config.settings import ConfigError, typed
from dpo.data.collate import pad_id_of
from dpo.maths.logprobs import head_logps, target_logps
from dpo.maths.rl import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate,
    clipped_token_losses,
    group_advantages,
    kl_estimate,
    masked_mean,
    response_positions,
)
from dpo.models.completions import completion_batch, completion_texts, score_texts
from dpo.models.forward import logits_at
from dpo.models.sampling import GenerationConfig, generation_problem, sample_groups
from dpo.rewards.registry import reward_from_config
from dpo.runtime.checks import refuse
from dpo.systems.assemble import (
    build_policy_and_reference,
    check_reward_and_minibatches,
    guard_config,
    optim_config,
    trained_reward,
)
from dpo.systems.base import GuardConfig, OptimConfig
from dpo.systems.on_policy import OnPolicySystem
from dpo.systems.reference import Reference
from dpo.systems.spec import SystemSpec


@dataclass
class GRPOConfig:
    """``conf/system/grpo.yaml``: GRPO against a reward, the KL to the reference in the loss.

    Attributes:
        kind: ``grpo``.
        reward: null: the run's ``reward`` group (the ground truth); or a reward config (``learned_rm``).
        include_prompt: score prompt + completion (True) or the completion alone.
        generation: how samples are drawn.
        samples_per_prompt: the group size k >= 2.
        epochs: passes over each batch's samples (TRL's ``num_iterations``; 1: on-policy, ratio 1).
        minibatch_size: samples per optimizer step on each rank; divides the rank's samples.
        baseline: ``mean`` (GRPO) or ``leave_one_out`` (RLOO).
        scale_rewards: divide advantages by the group's std (GRPO); false: Dr. GRPO, RLOO.
        kl_coef: the KL term's weight (beta; DeepSeekMath: 0.04); 0: none (no reference is run).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (:data:`dpo.maths.rl.KL_ESTIMATORS`).
        kl_in: ``loss`` (GRPO: ``+ beta * KL`` per token) or ``reward`` (RLOO: the score minus beta
            times the sequence's summed estimate, before the baseline).
        clip_range, clip_range_high: the ratio's clip, ``[1 - clip_range, 1 + clip_range_high]``
            (null high: symmetric; DAPO's clip-higher: 0.28).
        loss_type: ``grpo``, ``dr_grpo`` or ``dapo`` (:data:`dpo.maths.rl.LOSS_AGGREGATIONS`).
    """

    kind: str = "grpo"
    reward: Any = None
    include_prompt: bool = True
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    samples_per_prompt: int = 4
    epochs: int = 1
    minibatch_size: int = 8
    baseline: str = "mean"
    scale_rewards: bool = True
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    clip_range: float = 0.2
    clip_range_high: float | None = None
    loss_type: str = "grpo"

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key."""
        rules = [(key, getattr(self, key), ok, rule) for key, ok, rule in (
            ("samples_per_prompt", self.samples_per_prompt >= 2, ">= 2 (a group needs two samples)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("minibatch_size", self.minibatch_size >= 1, ">= 1"),
            ("baseline", self.baseline in ("mean", "leave_one_out"), "mean | leave_one_out"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in KL_ESTIMATORS, " | ".join(KL_ESTIMATORS)),
            ("kl_in", self.kl_in in ("loss", "reward"), "loss | reward"),
            ("clip_range", self.clip_range > 0, "> 0"),
            ("clip_range_high", self.clip_range_high is None or self.clip_range_high > 0, "> 0 or null"),
            ("loss_type", self.loss_type in LOSS_AGGREGATIONS, " | ".join(LOSS_AGGREGATIONS)),
        )]  # fmt: skip
        problem = generation_problem(self.generation)
        refuse(rules, problem and f"system.{problem}", prefix="system.")
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)


@dataclass
class Samples:
    """One batch's samples as (N, L) response-token tensors (``ids``/``mask``: (N, T) rows)."""

    ids: Tensor
    mask: Tensor
    pos: Tensor
    tgt: Tensor
    tok_mask: Tensor
    scores: Tensor  # (N,) raw
    logps: Tensor  # at sampling time
    ref_logps: Tensor
    advantages: Tensor  # (N,)


class GRPOModule(OnPolicySystem):
    """A policy trained by a critic-free policy gradient on groups of its own samples.

    One training batch (prompts; this rank's share) is one iteration: sample ``k`` per prompt
    (:func:`dpo.models.sampling.sample_groups`: seeded per step, row and sample), score them, take
    their log-probs under the policy and the reference, the group advantages, then ``epochs``
    passes of minibatch steps of the clipped surrogate (+ the KL term when ``kl_in=loss``),
    aggregated by ``loss_type``. Groups never straddle ranks (a prompt's samples are drawn on its
    rank), so the advantages are the same on any number of ranks; so is every step when a step
    takes a rank's whole batch (``minibatch_size`` = the rank's samples): the ``grpo`` and
    ``dr_grpo`` means are over equal shares, and ``dapo``'s token mean divides by every rank's
    tokens. With smaller minibatches each rank shuffles its own samples.

    Metrics (``train/pg/...``, means over every rank): ``reward`` (raw), ``kl`` (the summed k1
    estimate, ``log pi - log pi_ref``, at sampling time), ``advantage_std``, ``clip_frac``,
    ``approx_kl``, ``policy_loss``, ``kl_loss`` (the estimator's mean when in the loss),
    ``response_tokens``; ``train/loss``, ``train/grad_norm`` (means over the iteration's steps).
    """

    def __init__(self, policy: nn.Module, reference: Reference, reward: Callable[[list[str]], list[float]],
                 tokenizer: Any, cfg: GRPOConfig, optim: OptimConfig, *, seed: int = 0,
                 guard: GuardConfig | None = None, max_grad_norm: float | None = None) -> None:  # fmt: skip
        super().__init__(optim, guard)
        self.policy, self.reference, self.reward, self.tokenizer = policy, reference, reward, tokenizer
        self.pad_id = pad_id_of(tokenizer)
        self.cfg, self.seed, self.max_grad_norm = cfg, seed, max_grad_norm
        self._batch_rollouts = 0

    def optimizer_steps_per_batch(self) -> int:
        return self.cfg.epochs * math.ceil(self._batch_rollouts / self.cfg.minibatch_size)

    def token_logps(self, ids: Tensor, mask: Tensor, pos: Tensor, tgt: Tensor) -> Tensor:
        """(N, L) policy log-probs of the response tokens ``tgt`` predicted at ``pos``."""
        logits, _ = logits_at(self.policy, ids, mask, pos)
        return head_logps(logits, tgt)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], rows: Tensor) -> Samples:
        """Sample, score, log-probs (policy and reference) and group advantages of one batch."""
        k = self.cfg.samples_per_prompt
        groups = sample_groups(self.policy, prompts, rows.tolist(), k, self.cfg.generation, self.tokenizer,
                               self.seed, self.global_step)  # fmt: skip
        flat_prompts, flat = [p for p in prompts for _ in range(k)], [c for g in groups for c in g]
        prompt_texts, texts = completion_texts(self.tokenizer, flat_prompts, flat)
        scores = torch.tensor(score_texts(self.reward, prompt_texts, texts, self.cfg.include_prompt),
                              dtype=torch.float32, device=self.device)  # fmt: skip
        batch = completion_batch(flat_prompts, flat, self.pad_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        pos, tok_mask = response_positions([len(p) for p in flat_prompts], [len(c) for c in flat])
        pos, tok_mask = pos.to(self.device), tok_mask.to(self.device)
        tgt = torch.gather(ids, 1, (pos + 1) * tok_mask.long())  # (N, L) the response tokens (padding: ids[:, 0])
        was_training = self.policy.training
        self.policy.eval()
        logps = self.token_logps(ids, mask, pos, tgt) * tok_mask
        ref_logps = logps
        if self.cfg.kl_coef:
            ref_logits = self.reference.logits(ids, mask, self.policy)  # (N, T, V)
            ref_logps = target_logps(ref_logits[torch.arange(len(ids), device=ids.device)[:, None], pos], tgt)
            ref_logps = ref_logps * tok_mask
        self.policy.train(was_training)
        shaped = scores
        if self.cfg.kl_in == "reward" and self.cfg.kl_coef:
            seq_kl = (kl_estimate(logps, ref_logps, self.cfg.kl_estimator) * tok_mask).sum(1)  # (N,)
            shaped = scores - self.cfg.kl_coef * seq_kl
        advantages = group_advantages(shaped, k, self.cfg.baseline, self.cfg.scale_rewards)
        return Samples(ids, mask, pos, tgt, tok_mask, scores, logps, ref_logps, advantages)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        prompts, rows = [list(p) for p in batch["prompt_ids"]], batch["rows"]
        s = self.rollout(prompts, rows)
        n = self._batch_rollouts = len(s.ids)
        ones = torch.ones_like(s.scores)
        metrics = {
            "train/pg/reward": self.global_moments(s.scores, ones)[0],
            "train/pg/kl": self.global_moments((s.logps - s.ref_logps).sum(1), ones)[0],
            "train/pg/advantage_std": s.advantages.std() if n > 1 else torch.zeros((), device=self.device),
            "train/pg/response_tokens": self.global_moments(s.tok_mask.sum(1), ones)[0],
        }
        stats = self.optimize(s, rows.repeat_interleave(self.cfg.samples_per_prompt))
        metrics |= {f"train/pg/{k}": torch.stack(v).mean() for k, v in stats.items()}
        metrics["train/loss"] = metrics.pop("train/pg/loss")
        metrics["train/grad_norm"] = metrics.pop("train/pg/grad_norm")
        metrics |= self.health_metrics(int(s.mask.sum().item()), time.perf_counter() - started)
        self.local_metrics = {k: float(v) for k, v in metrics.items()}
        self.log_at_step(metrics, bar=("train/loss", "train/pg/reward", "train/pg/kl"))
        self.count_samples(s.tok_mask.sum(1))

    def optimize(self, s: Samples, rows: Tensor) -> dict[str, list[Tensor]]:
        """``epochs`` passes of minibatch steps over one batch's samples; returns per-step stats."""
        n, size = len(s.ids), self.cfg.minibatch_size
        if n % size:
            raise ValueError(f"system.minibatch_size={size} must divide each rank's samples ({n})")
        gen = torch.Generator().manual_seed(self.global_step)
        stats: dict[str, list[Tensor]] = {}
        for _ in range(self.cfg.epochs):
            for idx in torch.randperm(n, generator=gen).split(size):
                idx = idx.to(self.device)
                m = s.tok_mask[idx]
                logps = self.token_logps(s.ids[idx], s.mask[idx], s.pos[idx], s.tgt[idx]) * m
                per_token, clipped, approx_kl = clipped_token_losses(
                    logps, s.logps[idx], s.advantages[idx, None], m, self.cfg.clip_range, self.cfg.clip_range_high
                )
                policy_loss = aggregate(per_token, m, self.cfg.loss_type, self.cfg.generation.max_new_tokens)
                kl = kl_estimate(logps, s.ref_logps[idx], self.cfg.kl_estimator) * m
                if self.cfg.kl_in == "loss" and self.cfg.kl_coef:
                    per_token = per_token + self.cfg.kl_coef * kl
                tokens = self.sum_over_ranks(m.sum().detach()) / self.trainer.world_size  # dapo: every rank's
                loss = aggregate(per_token, m, self.cfg.loss_type, self.cfg.generation.max_new_tokens, tokens)
                norm = self.manual_step(loss, rows[idx.cpu()], self.max_grad_norm)
                step = {"loss": loss.detach(), "policy_loss": policy_loss.detach(), "grad_norm": norm,
                        "clip_frac": masked_mean(clipped, m), "approx_kl": masked_mean(approx_kl, m),
                        "kl_loss": masked_mean(kl.detach(), m)}  # fmt: skip
                for key, value in step.items():
                    stats.setdefault(key, []).append(value)
        return stats

    def report(self) -> list[str]:
        done = f"{self.cfg.kind}: {self.rollouts} samples, {self.generated_tokens} generated tokens"
        return [*super().report(), done]


def builder(schema: type) -> Callable[[DictConfig, Any, Any], GRPOModule]:
    """The ``build`` of a system of this family with its own schema (GRPO's, RLOO's defaults)."""

    def build(cfg: DictConfig, start: Any, tokenizer: Any) -> GRPOModule:
        """The policy, its frozen reference (none is run when ``kl_coef`` is 0) and the reward."""
        system = typed(cfg.system, schema)
        reward = reward_from_config(OmegaConf.to_container(trained_reward(cfg), resolve=True))
        policy, reference = build_policy_and_reference(cfg, start, tokenizer, needs_reference=system.kl_coef > 0)
        return GRPOModule(policy, reference, reward, tokenizer, system, optim_config(cfg, start), seed=cfg.seed,
                          guard=guard_config(cfg), max_grad_norm=cfg.trainer.get("gradient_clip_val"))  # fmt: skip

    return build


def check(cfg: DictConfig) -> None:
    """The reward is null or names one; minibatches divide each rank's samples; a KL term has a reference."""
    check_reward_and_minibatches(cfg)
    if cfg.system.kl_coef > 0 and cfg.reference.kind == "none":
        raise ConfigError(
            f"system.kl_coef={cfg.system.kl_coef} needs a reference (reference=copy or lora), or kl_coef=0"
        )


def steps_per_batch(cfg: Any) -> int:
    return cfg.system.epochs * math.ceil(cfg.data.micro_batch_size * cfg.system.samples_per_prompt /
                                         cfg.system.minibatch_size)  # fmt: skip


def describe(cfg: DictConfig) -> str:
    s = cfg.system
    return (f"system={s.kind}(reward={trained_reward(cfg).name}, k={s.samples_per_prompt}, kl_coef={s.kl_coef}, "
            f"{s.loss_type})")  # fmt: skip


def family(cfg: dict[str, Any]) -> tuple[str, str]:
    """``GRPO``/``RLOO``, with ``-GT`` against the evaluation's own reward; labelled by the KL weight."""
    system = cfg["system"]
    name = system["kind"].upper() + ("-GT" if (system.get("reward") or cfg["reward"]) == cfg["reward"] else "")
    return name, f"{name} kl={system['kl_coef']:g}"


SPEC = SystemSpec(
    GRPOConfig, builder(GRPOConfig), uses_loss=False, data="prompts", samples=True, references=("copy", "lora", "none"),
    check=check, describe=describe, family=family,
    shardable=False,  # samples are drawn from an unsharded policy, as PPO's
    steps_per_batch=steps_per_batch, manual_steps=True,
    sequences_per_example=lambda cfg: cfg.system.samples_per_prompt,
)  # fmt: skip
