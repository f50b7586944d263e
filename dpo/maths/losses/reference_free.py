"""Losses that need no reference model: SFT, Unlikelihood, reference-free DPO, SimPO, CPO, ORPO.

Notation: :mod:`dpo.maths.losses.base`. ``B`` pairs; every tensor is (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput


def nll_term(policy: PairLogps) -> Tensor:
    """Length-normalised NLL of the chosen response, -pc / |c|, (B,) (RPO, arXiv 2404.19733 Eq. 2)."""
    return -policy.chosen_mean


def token_mean_nll(policy: PairLogps) -> Tensor:
    """The batch's token-mean NLL of the chosen responses, -sum(pc) / sum(|c|), spread over the pairs:
    (B,) values ``-pc_i * B / sum(|c|)`` whose mean it is (TRL's ``sft`` term, and CPO's and ORPO's
    NLL, are this per-(micro-)batch token mean)."""
    return -policy.chosen * (policy.chosen.shape[0] / policy.chosen_tokens.sum().clamp(min=1.0))


def sft_loss(policy: PairLogps, reference: None = None) -> LossOutput:
    """Supervised fine-tuning on the chosen response: loss = -pc (summed NLL of the response).

    The batch loss is the mean over sequences of the summed token NLL, as in the official DPO
    repo's SFT trainer; this makes gradient accumulation exactly equal to a larger batch.
    """
    return LossOutput(-policy.chosen, None, None)


def sft_token_mean_loss(policy: PairLogps, reference: None = None) -> LossOutput:
    """SFT as TRL 1.16's DPO ``sft`` term: the batch's token-mean NLL of the chosen responses.

    loss = -sum_i pc_i / sum_i |c_i| over the (micro-)batch (:func:`token_mean_nll`). TRL's name
    ``sft`` is taken here by the summed form the SFT stage trains with (:func:`sft_loss`).
    """
    return LossOutput(token_mean_nll(policy), None, None)


def unlikelihood_loss(policy: PairLogps, reference: None = None, *, alpha: float) -> LossOutput:
    """Unlikelihood (Welleck et al. 2019, arXiv 1908.04319, Eq. 4), the DPO paper's baseline (Sec. 6).

    loss = -pc - alpha * sum_t log(1 - p(r_t | x, r_<t)): the chosen response's summed NLL (as
    :func:`sft_loss`) plus the token-level unlikelihood of the rejected response. The DPO paper
    sweeps alpha in {0.05, 0.1, 0.5, 1}. A sequence-level ``log(1 - p(r))`` would give no
    gradient (p(r) is ~0 for any real response), hence the token-level term.
    rewards = pc / |c|, pr / |r| (mean log-probs; there is no implicit reward).
    """
    if policy.rejected_unlikely is None:
        raise ValueError("unlikelihood needs the rejected responses' token-level log(1 - p) (rejected_unlikely)")
    losses = -policy.chosen - alpha * policy.rejected_unlikely
    return LossOutput(losses, policy.chosen_mean.detach(), policy.rejected_mean.detach())


def ref_free_dpo_loss(policy: PairLogps, reference: None = None, *, beta: float) -> LossOutput:
    """Reference-free DPO: DPO with an implicit uniform reference (official DPO repo option).

    loss = -log s(beta * (pc - pr)), rewards = beta * pc, beta * pr.
    """
    losses = -F.logsigmoid(beta * (policy.chosen - policy.rejected))
    return LossOutput(losses, beta * policy.chosen.detach(), beta * policy.rejected.detach())


def simpo_loss(policy: PairLogps, reference: None = None, *, beta: float, gamma: float) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): length-normalised, margin, no reference.

    loss = -log s(beta * pc / |c| - beta * pr / |r| - gamma),
    rewards = beta * pc / |c|, beta * pr / |r|.
    """
    chosen = beta * policy.chosen_mean
    rejected = beta * policy.rejected_mean
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return LossOutput(losses, chosen.detach(), rejected.detach())


def cpo_loss(policy: PairLogps, reference: None = None, *, beta: float, alpha: float) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, Sec. 3): reference-free DPO plus the chosen NLL.

    loss = -log s(beta * (pc - pr)) + alpha * NLL, NLL the batch's token-mean NLL of the chosen
    responses (:func:`token_mean_nll`, as TRL's CPOTrainer computes it); rewards = beta * pc, beta * pr.
    """
    margin = -F.logsigmoid(beta * (policy.chosen - policy.rejected))
    losses = margin + alpha * token_mean_nll(policy)
    return LossOutput(losses, beta * policy.chosen.detach(), beta * policy.rejected.detach())


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) of p = exp(mean log-prob) < 1: ``m - log(1 - e^m)``, stable as ``log(-expm1(m))``."""
    m = mean_logps.clamp(max=-1e-6)  # a response of probability 1 (or no token) would give log 0
    return m - torch.log(-torch.expm1(m))


def orpo_loss(policy: PairLogps, reference: None = None, *, beta: float) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7): the chosen NLL plus an odds-ratio term.

    With odds(y) = P / (1 - P), P = exp(p / |y|) the per-token mean likelihood:
    loss = NLL - beta * log s(log odds(c) - log odds(r)); beta is the paper's lambda (TRL's name), NLL
    the batch's token-mean NLL of the chosen responses (:func:`token_mean_nll`);
    rewards = beta * pc / |c|, beta * pr / |r| (as TRL logs them).
    """
    ratio = F.logsigmoid(_log_odds(policy.chosen_mean) - _log_odds(policy.rejected_mean))
    losses = token_mean_nll(policy) - beta * ratio
    return LossOutput(losses, beta * policy.chosen_mean.detach(), beta * policy.rejected_mean.detach())
