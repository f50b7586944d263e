"""The maths of RLHF's PPO stage (Ziegler et al. 2019, arXiv 1909.08593; Schulman et al. 2017,
arXiv 1707.06347; GAE: Schulman et al. 2016, arXiv 1506.02438), as pure functions of tensors.

The policy generates a response of ``T`` tokens; each token is one action. Tensors are shaped
``(N, T)``: ``N`` responses, ``T`` response tokens (right-padded), with a ``mask`` of 1 on real
tokens. :class:`dpo.systems.ppo.PPOModule` calls these in the order they are defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One batch of rollouts as per-token tensors, each (N, L) over response tokens unless noted.

    ``ids``/``mask`` are the (N, T) right-padded prompt + response rows; ``pos`` the position whose
    hidden state predicts each response token (and estimates the value of the state before it);
    ``tgt`` the token; ``tok_mask`` 1 on real response tokens.
    """

    ids: Tensor
    mask: Tensor
    pos: Tensor
    tgt: Tensor
    tok_mask: Tensor
    scores: Tensor  # (N,)
    logps: Tensor
    ref_logps: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor


def response_positions(prompt_lengths: list[int], response_lengths: list[int]) -> tuple[Tensor, Tensor]:
    """(N, L) predictor positions of the response tokens of right-padded prompt + response rows, and
    the (N, L) mask of real ones (padding positions point at 0)."""
    width = max(response_lengths)
    pos = torch.zeros((len(prompt_lengths), width), dtype=torch.long)
    mask = torch.zeros((len(prompt_lengths), width))
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        pos[i, :r] = torch.arange(p - 1, p - 1 + r)
        mask[i, :r] = 1
    return pos, mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 for an empty mask)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def shaped_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: the KL penalty on every token, the sequence's score on its last one.

    ``r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)) + [t = last] * score`` (Ziegler et al. 2019,
    eq. 2: the penalty summed over the response is ``kl_coef`` times the Monte-Carlo estimate of
    the sequence KL, ``log pi(y|x) - log pi_ref(y|x)``).

    Args:
        scores: (N,) the reward model's (or ground truth's) score of each response.
        logps, ref_logps: (N, T) the sampled tokens' log-probs under the policy at rollout time
            and under the reference.
        mask: (N, T) 1 on response tokens; every row has at least one.
        kl_coef: the penalty's coefficient (``beta`` of the paper's eq. 3).

    Returns:
        (N, T) rewards, 0 on padding.
    """
    if (mask.sum(1) < 1).any():
        raise ValueError("every response needs at least one token")
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = mask.sum(1).long() - 1  # (N,) index of each row's last token (right-padded rows)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last token is 0: the episode ends),
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t`` are the value targets.

    Returns:
        ``(advantages, returns)``, each (N, T), 0 on padding.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = mask[:, t]
        # On padding, carry nothing: the next real token's successor is the episode's end.
        advantages[:, t] = advantage * m
        next_value = values[:, t] * m
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(values: Tensor, mask: Tensor, mean: Tensor | None = None, var: Tensor | None = None) -> Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked entries, 0 on padding.

    ``mean`` and ``var`` default to the masked statistics of ``values``; pass global ones to whiten
    with statistics gathered over every rank (the PPO system does).
    """
    if mean is None:
        mean = masked_mean(values, mask)
    if var is None:
        var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


class PolicyLoss(NamedTuple):
    """The clipped surrogate and its diagnostics (all masked means over tokens).

    Attributes:
        loss: ``mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.
        clip_frac: share of tokens where the clipped term was the larger one.
        approx_kl: ``mean((ratio - 1) - log ratio)``, the k3 estimate of KL(old || new).
    """

    loss: Tensor
    clip_frac: Tensor
    approx_kl: Tensor


def clipped_token_losses(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float,
                         clip_high: float | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per token: ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high))`` (``clip_high``: DAPO's
    clip-higher, Yu et al. 2025, arXiv 2503.14476; None: ``clip``), whether the clipped term was the
    larger, and ``(ratio - 1) - log ratio``; each (N, T), 0 on padding."""
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    with torch.no_grad():
        was_clipped = (clipped > unclipped).float() * mask
        approx_kl = ((ratio - 1.0) - log_ratio) * mask
    return torch.maximum(unclipped, clipped) * mask, was_clipped, approx_kl


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float) -> PolicyLoss:
    """PPO's clipped surrogate objective, negated (Schulman et al. 2017, eq. 7), token-level."""
    losses, was_clipped, approx_kl = clipped_token_losses(logps, old_logps, advantages, mask, clip)
    return PolicyLoss(masked_mean(losses, mask), masked_mean(was_clipped, mask), masked_mean(approx_kl, mask))


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """``0.5 * mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))`` over tokens.

    The value's move away from its rollout-time estimate is clipped like the policy's ratio
    (the PPO2 baselines implementation; TRL and OpenRLHF do the same).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 is a perfect value function, 0 a constant."""
    mean_r = masked_mean(returns, mask)
    var_r = masked_mean((returns - mean_r) ** 2, mask)
    residual = returns - values
    var_res = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1.0 - var_res / var_r.clamp(min=1e-8)


class KLController:
    """The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019, sec. 2.2).

    Adaptive: after each rollout batch with mean sequence KL ``kl`` (the Monte-Carlo estimate),
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon`` where ``n`` is the number of
    responses in the batch.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000) -> None:
        if coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {coef}")
        if target is not None and target <= 0:
            raise ValueError(f"kl_target must be > 0 or null (a fixed coefficient), got {target}")
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon


class RewardNormalizer:
    """Rewards normalised by running statistics of every score seen so far (the authors' tuned
    PPO-GT used normalised rewards, per their OpenReview rebuttal; TRL's PPO had the same two
    options: ``use_score_scaling`` and ``use_score_norm``).

    ``mode``: ``none`` (scores as they are), ``scale`` (``score / std``) or ``standardize``
    (``(score - mean) / std``), with ``mean`` and ``std`` (population) of all scores so far,
    this batch's included, merged batch by batch (Chan et al.'s parallel update). A ``std`` of 0
    (every score so far equal) divides by 1.
    """

    MODES = ("none", "scale", "standardize")

    def __init__(self, mode: str = "none") -> None:
        if mode not in self.MODES:
            raise ValueError(f"reward_norm must be one of {self.MODES}, got {mode!r}")
        self.mode, self.mean, self.var, self.count = mode, 0.0, 0.0, 0

    def update(self, mean: float, var: float, n: int) -> None:
        """Merge a batch of ``n`` scores with mean ``mean`` and population variance ``var``."""
        if n <= 0:
            return
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def __call__(self, scores: Tensor) -> Tensor:
        if self.mode == "none":
            return scores
        std = math.sqrt(self.var) if self.var > 0 else 1.0
        return (scores - self.mean) / std if self.mode == "standardize" else scores / std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# --- critic-free policy gradients: GRPO, RLOO -----------------------------------------------------
# N = G x k responses: G prompts, k samples each, one prompt's samples consecutive.


def group_advantages(scores: Tensor, k: int, baseline: str, scale: bool) -> Tensor:
    """(N,) advantages of (N,) scores in groups of ``k`` consecutive samples (one prompt's).

    ``baseline``: ``mean`` (GRPO, Shao et al. 2024, arXiv 2402.03300, eq. 3: ``r_i - mean(r)``) or
    ``leave_one_out`` (RLOO, Ahmadian et al. 2024, arXiv 2402.14740, eq. 5: ``r_i - mean_{j != i}
    r_j``, which is ``k / (k - 1) * (r_i - mean(r))``). ``scale``: divide by the group's standard
    deviation (Bessel-corrected, as TRL 1.16's ``scale_rewards="group"``) plus 1e-4; Dr. GRPO (Liu et
    al. 2025, arXiv 2503.20783) and RLOO do not.
    """
    if k < 2 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not make groups of k={k} >= 2")
    groups = scores.view(-1, k)  # (G, k)
    centred = groups - groups.mean(1, keepdim=True)
    if baseline == "leave_one_out":
        centred = centred * k / (k - 1)
    elif baseline != "mean":
        raise ValueError(f"baseline must be mean or leave_one_out, got {baseline!r}")
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


KL_ESTIMATORS = ("k1", "k2", "k3")
"""Estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
divergence"): with ``log r = log pi_ref - log pi``, ``k1 = -log r`` (unbiased, high variance, can be
negative), ``k2 = (log r)^2 / 2``, ``k3 = (r - 1) - log r`` (unbiased, >= 0; GRPO's eq. 4)."""


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str) -> Tensor:
    """(N, T) per-token estimate of KL(pi || pi_ref) at the sampled tokens (:data:`KL_ESTIMATORS`)."""
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
"""How per-token losses become one number, by TRL 1.16's ``loss_type`` names: ``grpo`` the mean of
each response's token mean (Shao et al. 2024, eq. 3; long responses weigh less per token),
``dapo`` the mean over every token of the batch (Yu et al. 2025, eq. 8), ``dr_grpo`` the sum over
tokens divided by responses x ``max_new_tokens``, a constant (Liu et al. 2025)."""


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_tokens: int, total_tokens: Tensor | None = None
              ) -> Tensor:  # fmt: skip
    """One loss from (N, T) per-token losses (:data:`LOSS_AGGREGATIONS`). ``total_tokens``: ``dapo``'s
    denominator when it is not this batch's own token count (every rank's, for DDP)."""
    summed = (per_token * mask).sum(1)  # (N,)
    if mode == "grpo":
        return (summed / mask.sum(1).clamp(min=1)).mean()
    if mode == "dapo":
        return summed.sum() / (mask.sum() if total_tokens is None else total_tokens).clamp(min=1)
    if mode == "dr_grpo":
        return summed.sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
