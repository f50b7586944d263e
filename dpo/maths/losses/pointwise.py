"""Losses of each response's own log-ratio: ``lc`` and ``lr`` enter apart, not only as their margin.

No f-divergence applies to them (TRL 1.16 refuses the same set). Notation: :mod:`dpo.maths.losses.base`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput, log_ratios, ratio_rewards


def nca_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, the pairwise NCA objective); TRL's ``nca_pair``.

    loss = -log s(beta * lc) - 0.5 * log s(-beta * lc) - 0.5 * log s(-beta * lr).
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def bco_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656, its objective with delta = 0), as TRL's ``bco_pair``.

    loss = -log s(beta * lc) - log s(-beta * lr). The paper shifts both rewards by delta, a running
    mean of the rewards; TRL's pairwise form (and ours) drops the shift.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def sppo_hard_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7, P = 1 for the
    chosen response and 0 for the rejected one); TRL's ``sppo_hard``.

    loss = (lc - 1 / (2 * beta))^2 + (lr + 1 / (2 * beta))^2.
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def apo_zero_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): for chosen responses better than
    the model's own; raises the chosen likelihood and lowers the rejected one.

    loss = 1 - s(beta * lc) + s(beta * lr).
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))


def apo_down_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8): for chosen responses worse than
    the model's own; lowers both likelihoods, the rejected one more.

    loss = s(beta * lc) + 1 - s(beta * (lc - lr)).
    """
    chosen, rejected = log_ratios(policy, reference)
    losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    return LossOutput(losses, *ratio_rewards(policy, reference, beta))
