"""Losses of the log-ratio margin ``h = lc - lr``: DPO and the variants that replace its sigmoid.

Each reads the log-ratios only through the margin (or its length-normalised form), so an
``f_divergence_type`` can replace them by its scores (:mod:`dpo.maths.losses.modifiers`); AOT
sorts the margins' parts over the batch. Notation: :mod:`dpo.maths.losses.base`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput, log_ratios, ratio_margin, ratio_rewards


def dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """DPO, the sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7); TRL's ``sigmoid``.

    loss = -log s(beta * h), rewards = beta * lc, beta * lr.
    """
    losses = -F.logsigmoid(beta * ratio_margin(policy, reference))
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def _smoothed(logits: Tensor, eps: float) -> Tensor:
    """Binary cross-entropy of ``logits`` against the soft label ``1 - eps``."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def cdpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """Conservative DPO: DPO with labels flipped with probability eps (the official DPO repo's cDPO).

    loss = -(1 - eps) * log s(beta * h) - eps * log s(-beta * h), eps = label_smoothing in [0, 0.5).
    This is the cross-entropy against the smoothed label; it is minimised at a finite margin.
    """
    losses = _smoothed(beta * ratio_margin(policy, reference), label_smoothing)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def robust_dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8); TRL's ``robust``.

    loss = [(1 - eps) * (-log s(beta * h)) - eps * (-log s(-beta * h))] / (1 - 2 * eps).
    Unlike cDPO the eps-weighted term enters with a minus sign and the sum is rescaled, so the
    expected loss under flipped labels equals the clean DPO loss.
    """
    logits = beta * ratio_margin(policy, reference)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def ipo_sum_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """IPO on summed log-probs (Azar et al. 2023, arXiv 2310.12036, Eq. 17; official DPO repo form).

    loss = (h - 1 / (2 * beta))^2, beta playing the role of the paper's tau.
    """
    losses = (ratio_margin(policy, reference) - 1 / (2 * beta)) ** 2
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def _mean_ratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """Per-token log-ratios ``lc / |c|`` and ``lr / |r|`` (lengths floored at 1)."""
    chosen, rejected = log_ratios(policy, reference)
    return chosen / policy.chosen_tokens.clamp(min=1.0), rejected / policy.rejected_tokens.clamp(min=1.0)


def ipo_length_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """IPO on per-token mean log-probs (Azar et al. 2023, Eq. 17, as TRL's ``ipo`` computes it).

    h_norm = lc / |c| - lr / |r|;  loss = (h_norm - 1 / (2 * beta))^2.
    Rewards are beta * lc / |c| and beta * lr / |r| (TRL logs beta * lc, beta * lr).
    """
    chosen, rejected = _mean_ratios(policy, reference)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def sigmoid_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """Length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv 2411.15124, Sec. 5); TRL's ``sigmoid_norm``.

    loss = -log s(beta * (lc / |c| - lr / |r|)), rewards = beta * lc, beta * lr (as TRL logs them).
    """
    chosen, rejected = _mean_ratios(policy, reference)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def hinge_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """Hinge loss on the normalised likelihood (SLiC, arXiv 2305.10425; RSO, arXiv 2309.06657).

    loss = max(0, 1 - beta * h).
    """
    losses = torch.relu(1 - beta * ratio_margin(policy, reference))
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def exo_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, Eq. 16): reverse KL to the smoothed preference.

    With q = s(beta * h) the model's preference and p = (1 - eps, eps) the label:
    loss = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps), eps in (0, 0.5).
    """
    logits = beta * ratio_margin(policy, reference)
    eps = torch.as_tensor(label_smoothing, dtype=logits.dtype)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - torch.log(eps)
    )
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def discopop_loss(policy: PairLogps, reference: PairLogps, *, beta: float, tau: float) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, Eq. 5); TRL's ``discopop``.

    With x = beta * h and m = s(x / tau): loss = (1 - m) * (-log s(x)) + m * exp(-x); the paper's tau = 0.05.
    """
    logits = beta * ratio_margin(policy, reference)
    mix = torch.sigmoid(logits / tau)
    losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def aot_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, the paired objective): DPO on the batch's sorted margins.

    Sort ``pc - pr`` and ``rc - rr`` over the batch separately, d = sorted(pc - pr) - sorted(rc - rr):
    loss_i = -(1 - eps) * log s(beta * d_i) - eps * log s(-beta * d_i), the i-th quantile's loss (so a
    pair's loss is not its own: the mean is what is trained). rewards = beta * lc, beta * lr.
    """
    policy_margin, _ = torch.sort(policy.chosen - policy.rejected)
    reference_margin, _ = torch.sort(reference.chosen - reference.rejected)
    losses = _smoothed(beta * (policy_margin - reference_margin), label_smoothing)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def aot_unpaired_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882, the unpaired objective): chosen log-ratios' quantiles
    dominate the rejected ones'.

    d = sorted(lc) - sorted(lr) over the batch; loss_i = -(1 - eps) * log s(beta * d_i) - eps * log s(-beta * d_i).
    """
    chosen, rejected = log_ratios(policy, reference)
    delta = torch.sort(chosen)[0] - torch.sort(rejected)[0]
    return LossOutput(_smoothed(beta * delta, label_smoothing), *ratio_rewards(policy, reference, beta))
