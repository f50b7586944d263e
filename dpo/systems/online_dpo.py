"""The online DPO training system: preference pairs sampled from the policy as it learns, labelled by
a reward or a judge, trained with any pair loss of ``conf/loss``.

* Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
  2402.04792): every batch samples fresh responses from the current policy; the reference stays the
  starting model (``reference=copy``), or follows the policy as in TR-DPO (``reference.sync_every``).
* Iterative DPO (Xu et al. 2023, arXiv 2312.16682; Yuan et al. 2024, "Self-Rewarding Language
  Models", arXiv 2401.10020): ``system.rounds=R`` splits the run into R rounds; a round samples from
  the policy as it was when the round began, and at its end that policy becomes the reference. With
  ``system.judge={kind: self}`` the model that sampled judges its own samples (self-rewarding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dpo.config.settings import ConfigError, typed
from dpo.data.collate import collate, pad_id_of
from dpo.data.tokenize import TokenizedPair
from dpo.judges import JUDGES, Template
from dpo.judges.labels import Labeller, judge_config, judge_labels, reward_labels
from dpo.judges.local import LocalLMJudge
from dpo.maths.losses import Loss
from dpo.maths.pairs import PairMode, preference_pairs
from dpo.models.completions import completion_texts
from dpo.models.forward import score_pairs
from dpo.models.sampling import GenerationConfig, draw_seed, generation_problem, sample_groups
from dpo.rewards.registry import reward_from_config
from dpo.runtime.checks import refuse
from dpo.systems.assemble import build_policy_and_reference, guard_config, optim_config, trained_reward
from dpo.systems.base import GuardConfig, OptimConfig
from dpo.systems.dpo import family as loss_family
from dpo.systems.dpo import loss_params, run_loss
from dpo.systems.on_policy import OnPolicySystem
from dpo.systems.reference import Reference
from dpo.systems.spec import SystemSpec


@dataclass
class OnlineDPOConfig:
    """``conf/system/online_dpo.yaml``: pairs of the policy's own samples, labelled as they are drawn.

    Attributes:
        kind: ``online_dpo``.
        reward: what labels the samples: null, the run's ``reward`` group (the ground truth); or a
            ``conf/reward`` node such as ``{name: learned_rm, path: ...}``.
        judge: label by a pairwise judge instead (a round robin among each prompt's samples,
            :func:`dpo.judges.tournament.round_robin`): a ``conf/judge`` node (``api``, ``local``,
            ``reward``), or ``{kind: self}``: the model that sampled is its own judge.
        template: the judge's wording (a ``conf/template`` node), for the ``api``, ``local`` and
            ``self`` judges.
        include_prompt: the reward scores prompt + response (True) or the response alone.
        generation: how samples are drawn (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``).
        samples_per_prompt: responses sampled per prompt (k >= 2).
        pairs: ``best_worst`` or ``all`` (:class:`dpo.maths.pairs.PairMode`).
        min_margin: the smallest score gap a pair keeps (ties never make one).
        pairs_per_prompt: with ``pairs=all``, at most this many per prompt, widest gaps first (null: all).
        epochs: optimizer steps on each batch's pairs (each step on all of them).
        rounds: iterative DPO: the run's ``trainer.max_steps`` in this many rounds; null: online.
    """

    kind: str = "online_dpo"
    reward: Any = None
    judge: Any = None
    template: Any = None
    include_prompt: bool = True
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    samples_per_prompt: int = 2
    pairs: PairMode = PairMode.best_worst
    min_margin: float = 0.0
    pairs_per_prompt: int | None = None
    epochs: int = 1
    rounds: int | None = None

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key."""
        one = self.pairs_per_prompt in (None, 1) or self.pairs == PairMode.all
        rules = [(key, getattr(self, key), ok, rule) for key, ok, rule in (
            ("samples_per_prompt", self.samples_per_prompt >= 2, ">= 2 (a pair needs two samples)"),
            ("min_margin", self.min_margin >= 0, ">= 0"),
            ("pairs_per_prompt", self.pairs_per_prompt is None or self.pairs_per_prompt >= 1, ">= 1 or null"),
            ("pairs_per_prompt", one, "1 or null with pairs=best_worst (one pair per prompt)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("rounds", self.rounds is None or self.rounds >= 1, ">= 1 or null"),
        )]  # fmt: skip
        problem = generation_problem(self.generation)
        refuse(rules, problem and f"system.{problem}", prefix="system.")
        if isinstance(self.generation, dict):  # built in Python rather than composed
            self.generation = GenerationConfig(**self.generation)


class OnlineDPOModule(OnPolicySystem):
    """A policy trained on preference pairs of its own samples; see the module docstring.

    One training batch (a batch of prompts; this rank's share) is one iteration:

    1. sample ``k`` responses per prompt from the sampler (the policy, or in a round of iterative DPO
       the round's starting policy, which is then the reference), each drawn from uniforms seeded by
       (seed, step, row, sample), so a response does not depend on ranks, batching or a resume;
    2. label them (:data:`Labeller`) and keep pairs (:func:`dpo.maths.pairs.preference_pairs`; two
       identical responses never pair);
    3. ``epochs`` optimizer steps of the ``conf/loss`` loss on all the batch's pairs, each the mean
       over every rank's pairs (a rank's sum is scaled by world size over the global count, so DDP's
       gradient average is the global mean whatever each rank kept).

    Metrics (``train/online/...``, means over every rank's samples or pairs): ``reward`` (all
    samples' scores), ``reward_chosen``, ``reward_rejected``, ``pairs`` (per prompt), ``round``,
    ``response_tokens``; ``train/rewards/{accuracy,margin}`` and ``train/kl/chosen`` of the first
    step's pairs as DPO logs them; ``train/loss`` the mean over the steps (none without pairs);
    ``train/grad_norm`` the steps' mean norm before clipping.
    """

    def __init__(
        self, policy: nn.Module, reference: Reference, labeller: Labeller, tokenizer: Any, cfg: OnlineDPOConfig,
        loss: str, params: dict[str, Any], optim: OptimConfig, *, nll_weight: float = 0.0, seed: int = 0,
        round_steps: int = 0, guard: GuardConfig | None = None, max_grad_norm: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(optim, guard)
        self.loss = Loss.of(loss, params, nll_weight)
        self.policy, self.reference, self.labeller, self.tokenizer = policy, reference, labeller, tokenizer
        self.pad_id = pad_id_of(tokenizer)
        self.cfg = cfg
        self.seed, self.round_steps, self.max_grad_norm = seed, round_steps, max_grad_norm
        self.reward = getattr(labeller, "reward", None)  # a reward model moves to the rank's device

    def sampler(self) -> nn.Module:
        """What samples: the policy, or in iterative DPO the round's starting policy (the reference)."""
        return self.reference.model if self.round_steps else self.policy

    def optimizer_steps_per_batch(self) -> int:
        return self.cfg.epochs

    def sample(self, prompts: list[list[int]], rows: Tensor) -> list[list[list[int]]]:
        """``k`` responses to each prompt (:func:`dpo.models.sampling.sample_groups`)."""
        return sample_groups(self.sampler(), prompts, rows.tolist(), self.cfg.samples_per_prompt, self.cfg.generation,
                             self.tokenizer, self.seed, self.global_step)  # fmt: skip

    @torch.no_grad()
    def label(self, prompts: list[list[int]], samples: list[list[list[int]]], rows: Tensor) -> list[list[float]]:
        """Each sample's score by the labeller (a model judging itself judges in eval mode)."""
        k = self.cfg.samples_per_prompt
        prompt_texts, texts = completion_texts(self.tokenizer, [p for p in prompts for _ in range(k)],
                                               [c for cs in samples for c in cs])  # fmt: skip
        model = self.sampler()
        was_training = model.training
        model.eval()
        try:
            seeds = [draw_seed(self.seed, self.global_step, int(r), -1) for r in rows.tolist()]  # the judge's coins
            return self.labeller(prompt_texts[::k], [texts[i : i + k] for i in range(0, len(texts), k)], seeds)
        finally:
            model.train(was_training)

    def pairs_of(self, prompts: list[list[int]], samples: list[list[list[int]]], scores: list[list[float]],
                 rows: Tensor) -> list[tuple[TokenizedPair, float, float]]:  # fmt: skip
        """The batch's pairs (prompt, chosen, rejected, row) with the chosen and rejected scores."""
        out = []
        for prompt, responses, s, row in zip(prompts, samples, scores, rows.tolist(), strict=True):
            for i, j in preference_pairs(s, self.cfg.pairs, self.cfg.min_margin, self.cfg.pairs_per_prompt):
                if responses[i] != responses[j]:
                    out.append((TokenizedPair(prompt, responses[i], responses[j], index=row), s[i], s[j]))
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        prompts, rows = [list(p) for p in batch["prompt_ids"]], batch["rows"]
        samples = self.sample(prompts, rows)
        scores = self.label(prompts, samples, rows)
        pairs = self.pairs_of(prompts, samples, scores, rows)
        n_global = int(self.sum_over_ranks(torch.tensor(float(len(pairs)), device=self.device)).item())
        # a rank without pairs still steps with the others: a stand-in pair of weight 0
        examples = [p for p, _, _ in pairs] or [TokenizedPair(prompts[0], samples[0][0], samples[0][-1], index=-1)]
        weights = torch.tensor([1.0] * len(pairs) or [0.0], device=self.device)
        scale = self.trainer.world_size / max(n_global, 1)
        pair_batch = {k: v.to(self.device) if isinstance(v, Tensor) else v
                      for k, v in collate(examples, self.pad_id).items()}  # fmt: skip
        losses, norms, first = [], [], {}
        for _ in range(self.cfg.epochs):
            loss, metrics = self.pair_loss(pair_batch, weights, scale)
            norms.append(self.manual_step(loss, pair_batch["rows"].cpu(), self.max_grad_norm))
            self.reference.after_optimizer_step(self.policy, self.global_step)
            losses.append(loss.detach())
            first = first or metrics
        flat = torch.tensor([s for ss in scores for s in ss], device=self.device)
        tokens = torch.tensor([float(len(c)) for cs in samples for c in cs], device=self.device)
        metrics = first | self.sample_metrics(flat, tokens, pairs, weights, len(prompts))
        if not n_global:  # no pair on any rank: no pair means to log (not zeros)
            metrics = {k: v for k, v in metrics.items() if k not in first and "chosen" not in k and "rejected" not in k}
        if n_global:  # no pair anywhere: no loss to log (a 0 would read as a perfect fit)
            metrics["train/loss"] = torch.stack(losses).mean()
        metrics["train/grad_norm"] = torch.stack(norms).mean()  # over the iteration's steps, before clipping
        metrics |= self.health_metrics(int(tokens.sum().item() + sum(map(len, prompts)) * len(samples[0])),
                                       time.perf_counter() - started)  # fmt: skip
        self.local_metrics = {k: float(v) for k, v in metrics.items()}
        self.log_at_step(metrics, bar=("train/loss", "train/online/reward"))
        self.count_samples(tokens)

    def pair_loss(self, batch: dict[str, Any], weights: Tensor, scale: float) -> tuple[Tensor, dict[str, Tensor]]:
        """This rank's share of the global mean loss, and pair metrics (global means)."""
        spec = self.loss
        policy, logits = score_pairs(self.policy, batch, pairs=True, unlikelihood=spec.needs_unlikelihood,
                                     tails=spec.needs_tails, wpo=spec.wpo)
        reference = None
        if spec.needs_reference:
            with torch.no_grad():
                reference = self.reference.score(batch, self.policy, against=logits.detach(), tails=spec.needs_tails)
        out = spec(policy, reference)
        loss = (out.losses * weights).sum() * scale
        margin = (out.chosen_rewards - out.rejected_rewards).detach()
        metrics = {"train/rewards/accuracy": self.global_mean((margin > 0).float(), weights),
                   "train/rewards/margin": self.global_mean(margin, weights)}  # fmt: skip
        if reference is not None and reference.chosen_kl is not None:
            metrics["train/kl/chosen"] = self.global_mean(reference.chosen_kl, weights)
        return loss, metrics

    def global_mean(self, values: Tensor, weights: Tensor) -> Tensor:
        """Mean of ``values`` over every rank's rows of weight 1."""
        return self.global_moments(values.float(), weights)[0]

    def sample_metrics(self, scores: Tensor, tokens: Tensor, pairs: list[tuple[Any, float, float]],
                       weights: Tensor, n_prompts: int) -> dict[str, Tensor]:  # fmt: skip
        """``train/online/...``: scores of every sample and of the pairs kept, pairs per prompt, the round."""
        ones = torch.ones_like(scores)
        chosen = torch.tensor([c for _, c, _ in pairs] or [0.0], device=self.device)
        rejected = torch.tensor([r for _, _, r in pairs] or [0.0], device=self.device)
        counts = self.sum_over_ranks(torch.tensor([float(len(pairs)), float(n_prompts)], device=self.device))
        step = self.global_step - self.cfg.epochs  # the batch's first step (global_step has counted them)
        return {
            "train/online/reward": self.global_mean(scores, ones),
            "train/online/reward_chosen": self.global_mean(chosen, weights),
            "train/online/reward_rejected": self.global_mean(rejected, weights),
            "train/online/pairs": counts[0] / counts[1],
            "train/online/response_tokens": self.global_mean(tokens, ones),
            "train/online/round": torch.tensor(
                float(step // self.round_steps + 1 if self.round_steps else 1), device=self.device
            ),
        }

    def report(self) -> list[str]:
        rounds = f", {self.cfg.rounds} rounds of {self.round_steps} steps" if self.round_steps else ""
        done = f"online dpo: {self.rollouts} samples, {self.generated_tokens} generated tokens{rounds}"
        return [*super().report(), done]


def round_steps(cfg: DictConfig) -> int:
    """Optimizer steps per round of iterative DPO (0: online)."""
    return cfg.trainer.max_steps // cfg.system.rounds if cfg.system.rounds else 0


def labeller(cfg: DictConfig, system: OnlineDPOConfig, sampler: nn.Module, tokenizer: Any) -> Labeller:
    """What labels the samples: the judge if one is set, else the reward (null: the ground truth)."""
    judge = judge_config(cfg.system.judge)
    if judge is None:
        node = OmegaConf.to_container(trained_reward(cfg), resolve=True)
        return reward_labels(reward_from_config(node), system.include_prompt)
    if judge.kind == "reward":
        return judge_labels(JUDGES["reward"](judge, Template()), judge.orders)
    template = typed(cfg.system.template, Template)
    if judge.kind == "self":
        local = LocalLMJudge.Config(orders=judge.orders, batch_size=judge.batch_size)
        return judge_labels(LocalLMJudge(local, template, cfg.paths.cache_dir, sampler, tokenizer), judge.orders)
    if judge.kind == "local":
        return judge_labels(LocalLMJudge(judge, template, cfg.paths.cache_dir), judge.orders)
    return judge_labels(JUDGES[judge.kind](judge, template), judge.orders)


def build(cfg: DictConfig, start: Any, tokenizer: Any) -> OnlineDPOModule:
    """The online DPO system: the policy, its reference (moved each round in iterative DPO), the labeller."""
    system = typed(cfg.system, OnlineDPOConfig)
    steps = round_steps(cfg)
    if steps:  # the reference becomes the policy at each round's end: TR-DPO's hard sync every round
        cfg = OmegaConf.merge(cfg, {"reference": {"sync_every": steps, "sync_alpha": 1.0}})
    spec = run_loss(cfg)
    policy, reference = build_policy_and_reference(cfg, start, tokenizer, needs_reference=spec.needs_reference or
                                                   bool(steps))  # fmt: skip
    sampler = reference.model if steps else policy
    return OnlineDPOModule(
        policy, reference, labeller(cfg, system, sampler, tokenizer), tokenizer, system, cfg.loss.name,
        loss_params(cfg), optim_config(cfg, start), nll_weight=cfg.loss.nll_weight, seed=cfg.seed,
        round_steps=steps, guard=guard_config(cfg), max_grad_norm=cfg.trainer.get("gradient_clip_val"),
    )  # fmt: skip


def check(cfg: DictConfig) -> None:
    """A pair loss; one labeller (a reward or a judge) with what it needs; rounds that fit the run."""
    online = cfg.system
    loss = run_loss(cfg)
    if not loss.needs_pairs:
        raise ConfigError(f"system=online_dpo trains on pairs; loss={cfg.loss.name} trains on one response")
    if coupled := [name for (name, _), spec in zip(loss.terms, loss.specs, strict=True) if spec.batch_coupled]:
        raise ConfigError(f"system=online_dpo weighs each pair apart (ranks' pair counts differ); {coupled} couple "
                          "the pairs of a batch: choose a per-pair loss")
    if online.reward is not None and "name" not in online.reward:
        raise ConfigError("system.reward must be null (the ground truth, `reward`) or a reward config with a `name`")
    judge = judge_config(online.judge)
    if judge is not None and online.reward is not None:
        raise ConfigError("system.judge and system.reward both label the samples: set one (the other null)")
    if judge is not None and judge.kind != "reward" and online.template is None:
        raise ConfigError(f"system.judge={judge.kind} needs system.template (e.g. +template@system.template=positive)")
    if judge is not None and judge.kind == "reward" and not judge.reward:
        raise ConfigError("system.judge.kind=reward needs system.judge.reward (a conf/reward node)")
    if online.rounds:
        max_steps = cfg.trainer.get("max_steps") or -1
        if max_steps <= 0 or max_steps % (online.rounds * online.epochs):
            raise ConfigError(
                f"system.rounds={online.rounds} splits trainer.max_steps into rounds of whole batches: set "
                f"trainer.max_steps to a multiple of rounds x system.epochs ({online.rounds * online.epochs})"
            )
        if cfg.reference.kind != "copy" or cfg.reference.get("sync_every"):
            raise ConfigError("system.rounds moves the reference itself (the policy at each round's end): use "
                              "reference=copy with reference.sync_every=0")  # fmt: skip


def describe(cfg: DictConfig) -> str:
    online = cfg.system
    by = (f"judge={online.judge.kind}" if online.judge is not None else
          f"reward={(online.reward or cfg.reward).name}")  # fmt: skip
    rounds = f", rounds={online.rounds}" if online.rounds else ""
    return f"system=online_dpo(loss={cfg.loss.name}, {by}, k={online.samples_per_prompt}{rounds})"


def family(cfg: dict[str, Any]) -> tuple[str, str]:
    """``Online DPO`` or ``Iterative DPO``, with ``-GT`` when labelled by the evaluation's own reward
    (the ground truth); labelled by the loss as DPO's runs are."""
    system = cfg["system"]
    name = "Iterative DPO" if system.get("rounds") else "Online DPO"
    if system.get("judge") is None and (system.get("reward") or cfg["reward"]) == cfg["reward"]:
        name += "-GT"
    _, label = loss_family(cfg)
    rounds = f" R={system['rounds']}" if system.get("rounds") else ""
    return name, f"{name} {label.split(' ', 1)[-1] if cfg['loss']['name'] == 'dpo' else label}{rounds}"


SPEC = SystemSpec(
    OnlineDPOConfig, build, uses_loss=True, data="prompts", samples=True, references=("copy", "lora", "none"),
    check=check, describe=describe, family=family,
    shardable=False,  # its samples are drawn from an unsharded policy, as PPO's
    steps_per_batch=lambda cfg: cfg.system.epochs, manual_steps=True,
    sequences_per_example=lambda cfg: cfg.system.samples_per_prompt,
)  # fmt: skip
