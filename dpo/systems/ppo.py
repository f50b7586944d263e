"""The PPO training system: RLHF's second stage (Ziegler et al. 2019, arXiv 1909.08593), the
baseline DPO replaces. With a ground-truth reward it is the paper's PPO-GT; with a learned reward
model (``reward=learned_rm``) it is PPO."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dpo.config.settings import typed
from dpo.data.collate import pad_id_of
from dpo.maths.logprobs import head_logps, target_logps
from dpo.maths.rl import (
    KLController,
    RewardNormalizer,
    Rollout,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    masked_mean,
    response_positions,
    shaped_rewards,
    whiten,
)
from dpo.maths.tiled import HeadInputs, tiled_token_stats
from dpo.models.completions import completion_batch, completion_texts, score_texts
from dpo.models.forward import logits_at
from dpo.models.sampling import GenerationConfig, generate, generation_problem
from dpo.rewards.registry import reward_from_config
from dpo.runtime.checks import refuse
from dpo.systems.assemble import (
    build_policy_and_reference,
    check_reward_and_minibatches,
    guard_config,
    optim_config,
    trained_reward,
)
from dpo.systems.base import GuardConfig, OptimConfig, System
from dpo.systems.reference import Reference
from dpo.systems.spec import SystemSpec


@dataclass
class PPOConfig:
    """``conf/system/ppo.yaml``: PPO against a reward with a per-token KL penalty (``conf/loss`` unused).

    Attributes:
        kind: ``ppo``.
        reward: the reward PPO maximises, a ``conf/reward`` node such as a learned reward model
            (``{name: learned_rm, path: ...}``: PPO); null: the run's ``reward`` group, the ground
            truth the evaluation uses (PPO-GT).
        include_prompt: score prompt + completion (True) or the completion alone.
        generation: how rollouts are sampled (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``).
        samples_per_prompt: rollouts per prompt of a batch.
        ppo_epochs: passes over each rollout batch.
        minibatch_size: rollouts per gradient step on each rank; it must divide the rank's rollouts
            (``data.micro_batch_size * samples_per_prompt``).
        kl_coef: the KL penalty's coefficient (initial value when adaptive).
        kl_target: adapt the coefficient towards this sequence KL (nats); null: fixed.
        kl_horizon: the adaptive controller's horizon, in rollouts.
        reward_norm: ``none``, ``scale`` or ``standardize`` the scores by running statistics of
            every score so far (:class:`dpo.maths.rl.RewardNormalizer`); the logged reward stays raw.
        gamma, lam: GAE's discount and lambda.
        clip_range: PPO's ratio clip epsilon.
        clip_range_value: clip of the value's move from its rollout-time estimate.
        vf_coef: the value loss's weight in the (shared-trunk) loss.
    """

    kind: str = "ppo"
    reward: Any = None
    include_prompt: bool = True
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    samples_per_prompt: int = 1
    ppo_epochs: int = 4
    minibatch_size: int = 8
    kl_coef: float = 0.2
    kl_target: float | None = None
    kl_horizon: int = 10000
    reward_norm: str = "none"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key (a wrong sign used to train to the end)."""
        rules = [(key, getattr(self, key), ok, rule) for key, ok, rule in (
            ("samples_per_prompt", self.samples_per_prompt >= 1, ">= 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"),
            ("minibatch_size", self.minibatch_size >= 1, ">= 1"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_target", self.kl_target is None or self.kl_target > 0, "> 0 or null"),
            ("kl_horizon", self.kl_horizon >= 1, ">= 1"),
            ("reward_norm", self.reward_norm in RewardNormalizer.MODES, " | ".join(RewardNormalizer.MODES)),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("clip_range", self.clip_range > 0, "> 0"),
            ("clip_range_value", self.clip_range_value > 0, "> 0"),
            ("vf_coef", self.vf_coef >= 0, ">= 0"),
        )]  # fmt: skip
        problem = generation_problem(self.generation)  # its own checks, by key
        refuse(rules, problem and f"system.{problem}", prefix="system.")
        if isinstance(self.generation, dict):  # built in Python rather than composed
            self.generation = GenerationConfig(**self.generation)


def ppo_steps_per_batch(cfg: Any) -> int:
    """Optimizer steps of one PPO iteration from the composed config: ``ppo_epochs`` passes over each
    rank's ``micro_batch_size x samples_per_prompt`` rollouts in minibatches of ``minibatch_size``."""
    rollouts = cfg.data.micro_batch_size * cfg.system.samples_per_prompt
    return cfg.system.ppo_epochs * math.ceil(rollouts / cfg.system.minibatch_size)


class PPOModule(System):
    """A policy trained by PPO on its own samples, a value head on its trunk, a frozen reference.

    Each training batch is a batch of prompts (this rank's share). One batch is one PPO iteration:

    1. rollout: sample completions (:func:`dpo.models.sampling.generate`), score them with the reward,
       and, without gradients, the sampled tokens' log-probs under the policy and the reference
       and the value of every state;
    2. per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` on every token, plus the score on the
       last (:func:`dpo.maths.rl.shaped_rewards`); advantages by GAE, whitened with statistics over
       every rank's rollouts;
    3. ``ppo_epochs`` passes over the rollouts in minibatches of ``minibatch_size``: the clipped
       policy loss plus ``vf_coef`` times the clipped value loss, one optimizer step each.

    So ``trainer.global_step`` counts optimizer steps, as for DPO, and the evaluation callback's
    points land on the same frontier. Optimization is manual (several steps per batch); the
    non-finite guard and gradient clipping (``trainer.gradient_clip_val``, applied here) work as
    for DPO.

    The value head is a linear layer on the policy's last hidden state (a shared trunk, as in
    Ziegler et al. and TRL's ``AutoModelForCausalLMWithValueHead``): one forward gives logits and
    values, and the model in memory is the policy alone. It is zero-initialised (every value
    starts at 0), saved in checkpoints and not exported (the export is the policy).

    Metrics (``train/ppo/...``, means over the rollouts of one batch, all ranks): ``reward`` (raw
    score), ``reward_penalized`` (score minus ``kl_coef`` times the sequence KL estimate), ``kl``
    (``log pi(y|x) - log pi_ref(y|x)`` of the rollouts), ``kl_coef``, ``entropy`` (per token),
    ``clip_frac``, ``approx_kl``, ``policy_loss``, ``value_loss``, ``explained_variance``,
    ``response_tokens``; ``train/loss`` is the mean total loss; ``train/grad_norm`` the mean of the
    iteration's gradient norms before clipping; ``train/tokens_per_s`` and ``train/peak_memory_mb``
    as :meth:`System.on_train_batch_end` defines them, over the whole iteration (its rollouts'
    prompt and response tokens; sampling, scoring and updates timed).

    Args:
        policy: the causal LM to train.
        reference: the frozen reference (``copy`` or ``lora``; it must give logits for new sequences).
        reward: ``texts -> scores``.
        tokenizer: decodes the rollouts for the reward (:func:`dpo.models.completions.completion_texts`);
            its pad and EOS ids end and pad the samples; it finds ``generation.stop`` strings.
        cfg: the ``conf/system/ppo.yaml`` config.
        optim: optimizer and schedule.
        guard: what a non-finite loss or gradient does.
        max_grad_norm: clip the gradient norm to this (``trainer.gradient_clip_val``); None: no clipping.
        sharded: whether the policy is sharded across ranks (FSDP): generation then runs ``synced_gpus``.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: Reference,
        reward: Callable[[list[str]], list[float]],
        tokenizer: Any,
        cfg: PPOConfig,
        optim: OptimConfig,
        guard: GuardConfig | None = None,
        max_grad_norm: float | None = None,
        sharded: bool = False,
    ) -> None:
        super().__init__(optim, guard)
        self.automatic_optimization = False
        self.policy = policy
        self.reference = reference
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reward, self.tokenizer = reward, tokenizer
        self.pad_id, self.eos_id = pad_id_of(tokenizer), tokenizer.eos_token_id
        self.cfg = cfg
        self.gen = cfg.generation
        self.gen.kwargs()
        self.kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.norm = RewardNormalizer(cfg.reward_norm)
        self.max_grad_norm = max_grad_norm
        self.sharded = sharded
        self.generated_tokens = 0  # rollout tokens over all ranks (the cost the frontier table reports)
        self.rollouts = 0
        self._batch_rollouts = 0  # this rank's rollouts in the last batch
        self.local_metrics: dict[str, float] = {}  # this rank's share of the last batch's metrics, before the mean

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.policy.parameters() if p.requires_grad)
        yield from self.value_head.parameters()

    def minibatches_per_batch(self, rollouts: int) -> int:
        """Gradient steps per PPO epoch for ``rollouts`` rollouts on a rank."""
        if rollouts % self.cfg.minibatch_size:
            raise ValueError(
                f"system.minibatch_size={self.cfg.minibatch_size} must divide each rank's rollouts ({rollouts} = "
                "data.micro_batch_size x system.samples_per_prompt)"
            )
        return rollouts // self.cfg.minibatch_size

    def forward_tokens(
        self, ids: Tensor, mask: Tensor, pos: Tensor, tgt: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | HeadInputs]:
        """Policy log-probs of ``tgt`` (N, L), values (N, L) and the (N, L, V) logits at ``pos`` (or
        the head's inputs there, whose log-probs come in tiles: :func:`dpo.models.forward.logits_at`)."""
        logits, hidden = logits_at(self.policy, ids, mask, pos)  # hidden: (N, L, H)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return head_logps(logits, tgt), values, logits

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> tuple[Rollout, int]:
        """Sample, score and evaluate one batch of rollouts (no gradients); returns it and its token count."""
        completions = generate(self.policy, prompts, self.gen, self.pad_id, self.eos_id, batch_size=len(prompts),
                               synced_gpus=self.sharded, tokenizer=self.tokenizer)  # fmt: skip
        completions = [c or [self.eos_id if self.eos_id is not None else self.pad_id] for c in completions]
        prompt_texts, texts = completion_texts(self.tokenizer, prompts, completions)
        scores = score_texts(self.reward, prompt_texts, texts, self.cfg.include_prompt)
        scores = torch.tensor(scores, dtype=torch.float32, device=self.device)
        batch = completion_batch(prompts, completions, self.pad_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        pos, tok_mask = response_positions([len(p) for p in prompts], [len(c) for c in completions])
        pos, tok_mask = pos.to(self.device), tok_mask.to(self.device)
        tgt = torch.gather(ids, 1, (pos + 1) * tok_mask.long())  # (N, L) the response tokens (padding: ids[:, 0])
        was_training = self.policy.training
        self.policy.eval()
        logps, values, _ = self.forward_tokens(ids, mask, pos, tgt)
        ref_logits = self.reference.logits(ids, mask, self.policy)  # (N, T, V)
        rows = torch.arange(len(ids), device=ids.device)[:, None]
        ref_logps = target_logps(ref_logits[rows, pos], tgt)
        self.policy.train(was_training)
        if self.norm.mode != "none":  # running statistics over every rank's scores
            mean, var, count = self.global_moments(scores, torch.ones_like(scores))
            self.norm.update(float(mean), float(var), int(count.item()))
        rewards = shaped_rewards(self.norm(scores), logps * tok_mask, ref_logps * tok_mask, tok_mask, self.kl.coef)
        advantages, returns = gae(rewards, values, tok_mask, self.cfg.gamma, self.cfg.lam)
        mean, var, _ = self.global_moments(advantages, tok_mask)
        advantages = whiten(advantages, tok_mask, mean, var)
        out = Rollout(ids, mask, pos, tgt, tok_mask, scores, logps * tok_mask, ref_logps * tok_mask,
                      values * tok_mask, advantages, returns)  # fmt: skip
        return out, int(tok_mask.sum().item())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts = [list(p) for p in batch["prompt_ids"] for _ in range(self.cfg.samples_per_prompt)]
        rows = batch["rows"].repeat_interleave(self.cfg.samples_per_prompt)
        started = time.perf_counter()
        ro, tokens = self.rollout(prompts)
        n = self._batch_rollouts = len(prompts)
        seq_kl = (ro.logps - ro.ref_logps).sum(1)  # (N,) Monte-Carlo sequence KL of each rollout
        metrics = {
            "train/ppo/reward": ro.scores.mean(),
            "train/ppo/reward_penalized": (ro.scores - self.kl.coef * seq_kl).mean(),
            "train/ppo/kl": seq_kl.mean(),
            "train/ppo/kl_coef": torch.tensor(self.kl.coef, device=self.device),
            "train/ppo/response_tokens": ro.tok_mask.sum(1).mean(),
        }
        stats = self.optimize(ro, rows)
        metrics |= {f"train/ppo/{k}": torch.stack(v).mean() for k, v in stats.items()}
        metrics["train/loss"] = metrics.pop("train/ppo/loss")
        metrics["train/grad_norm"] = metrics.pop("train/ppo/grad_norm")  # mean over the iteration's steps
        # Throughput of the iteration (sampling, scoring and updates): its rollouts' prompt and response tokens.
        metrics |= self.health_metrics(int(ro.mask.sum().item()), time.perf_counter() - started)
        self.local_metrics = {k: float(v) for k, v in metrics.items()}
        self.log_at_step(metrics, bar=("train/loss", "train/ppo/reward", "train/ppo/kl"))
        everyone = self.sum_over_ranks(torch.tensor([float(tokens), float(n), float(seq_kl.sum())], device=self.device))
        self.generated_tokens += int(everyone[0].item())
        self.rollouts += int(everyone[1].item())
        self.kl.update(float(everyone[2] / everyone[1]), int(everyone[1].item()))

    def optimize(self, ro: Rollout, rows: Tensor) -> dict[str, list[Tensor]]:
        """``ppo_epochs`` passes of minibatch updates over one rollout batch; returns per-step stats."""
        n = len(ro.ids)
        size = self.cfg.minibatch_size
        self.minibatches_per_batch(n)
        gen = torch.Generator().manual_seed(self.global_step)
        stats: dict[str, list[Tensor]] = {}
        for _ in range(self.cfg.ppo_epochs):
            for idx in torch.randperm(n, generator=gen).split(size):
                idx = idx.to(self.device)
                m = ro.tok_mask[idx]
                logps, values, logits = self.forward_tokens(ro.ids[idx], ro.mask[idx], ro.pos[idx], ro.tgt[idx])
                # before the step: a head's inputs hold the head's weight, which the step changes in place
                ent = masked_mean(tiled_token_stats(logits, want=("entropy",))["entropy"], m)
                pg = clipped_policy_loss(logps * m, ro.logps[idx], ro.advantages[idx], m, self.cfg.clip_range)
                vf = clipped_value_loss(values * m, ro.values[idx], ro.returns[idx], m, self.cfg.clip_range_value)
                loss = pg.loss + self.cfg.vf_coef * vf
                grad_norm = self.manual_step(loss, rows[idx.cpu()], self.max_grad_norm)
                with torch.no_grad():
                    step = {
                        "loss": loss.detach(), "policy_loss": pg.loss.detach(), "value_loss": vf.detach(),
                        "clip_frac": pg.clip_frac, "approx_kl": pg.approx_kl, "grad_norm": grad_norm,
                        "entropy": ent,
                        "explained_variance": explained_variance(values.detach() * m, ro.returns[idx], m),
                    }  # fmt: skip
                for k, v in step.items():
                    stats.setdefault(k, []).append(v)
        return stats

    def on_fit_start(self) -> None:
        if hasattr(self.reward, "to"):  # a reward model scores on this rank's device
            self.reward.to(self.device)

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps the last training batch made (the evaluation callback's clock)."""
        return self.cfg.ppo_epochs * math.ceil(self._batch_rollouts / self.cfg.minibatch_size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """PPO has no held-out loss; its held-out measure is the evaluation callback (reward and KL)."""
        return None

    def report(self) -> list[str]:
        return super().report() + [
            f"ppo: {self.rollouts} rollouts, {self.generated_tokens} generated tokens, final kl_coef {self.kl.coef:.4g}"
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_ppo"] = {"kl_coef": self.kl.coef, "generated_tokens": self.generated_tokens,
                                 "rollouts": self.rollouts, "reward_norm": self.norm.state_dict()}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("dpo_ppo", {})
        self.kl.coef = float(saved.get("kl_coef", self.kl.coef))
        self.generated_tokens = int(saved.get("generated_tokens", 0))
        self.rollouts = int(saved.get("rollouts", 0))
        if "reward_norm" in saved:
            self.norm.load_state_dict(saved["reward_norm"])


def build(cfg: DictConfig, start: Any, tokenizer: Any) -> PPOModule:
    """The PPO system: the policy, its frozen reference and the reward it maximises."""
    system = typed(cfg.system, PPOConfig)
    reward = reward_from_config(OmegaConf.to_container(trained_reward(cfg), resolve=True))
    policy, reference = build_policy_and_reference(cfg, start, tokenizer, needs_reference=True)

    return PPOModule(
        policy, reference, reward, tokenizer, system,
        optim_config(cfg, start), guard=guard_config(cfg), max_grad_norm=cfg.trainer.get("gradient_clip_val"),
    )  # fmt: skip


def describe(cfg: DictConfig) -> str:
    return (f"system=ppo(reward={trained_reward(cfg).name}, kl_coef={cfg.system.kl_coef}, "
            f"kl_target={cfg.system.kl_target})")  # fmt: skip


def family(cfg: dict[str, Any]) -> tuple[str, str]:
    """``PPO-GT`` when the run maximised the evaluation's own reward (the ground truth), else ``PPO``
    (a learned reward model); labelled by its KL coefficient (and target)."""
    system = cfg["system"]
    trained_on = system.get("reward") or cfg["reward"]
    name = "PPO-GT" if trained_on == cfg["reward"] else "PPO"
    target = f"->{system['kl_target']:g}" if system.get("kl_target") else ""
    return name, f"{name} kl={system['kl_coef']:g}{target}"


SPEC = SystemSpec(
    PPOConfig, build, uses_loss=False, data="prompts", samples=True, references=("copy", "lora"),
    check=check_reward_and_minibatches, describe=describe, family=family,
    shardable=False,  # its value head and rollouts are not sharded yet
    steps_per_batch=ppo_steps_per_batch, manual_steps=True, checkpoint_extras=("value_head.",),
    sequences_per_example=lambda cfg: cfg.system.samples_per_prompt,
)  # fmt: skip
