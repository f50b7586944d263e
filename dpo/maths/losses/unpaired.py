"""KTO: a loss of unpaired completions, each labelled desirable or undesirable.

Not in the pair registry (``conf/loss``): its examples carry a label and a mismatched completion
for the KL reference point, so the KTO system (:mod:`dpo.systems.kto`) calls it. Notation:
:mod:`dpo.maths.losses.base`; ``B`` completions, each tensor (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput, log_ratios


def kto_reference_point(policy: PairLogps, reference: PairLogps) -> Tensor:
    """KTO's z_ref (Ethayarajh et al. 2024, arXiv 2402.01306, Sec. 4.1): the batch mean of the
    log-ratios of the mismatched completions (``rejected``), floored at 0, no gradient; a biased but
    cheap estimate of KL(policy || reference), as the paper and TRL 1.16 take it. A scalar."""
    _, mismatched = log_ratios(policy, reference)
    return mismatched.detach().mean().clamp(min=0)


def kto_loss(policy: PairLogps, reference: PairLogps, desirable: Tensor, z_ref: Tensor, *, beta: float,
             desirable_weight: float, undesirable_weight: float) -> LossOutput:  # fmt: skip
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8; TRL 1.16's ``kto``).

    With r = beta * (pc - rc) the completion's implicit reward (``chosen``: the completion) and
    z = beta * z_ref: loss = lambda_D * (1 - s(r - z)) for a desirable completion,
    lambda_U * (1 - s(z - r)) for an undesirable one; the batch loss is the mean over completions.
    ``chosen_rewards`` holds r of the desirable completions and NaN elsewhere, ``rejected_rewards``
    the converse (their nan-means are TRL's ``rewards/chosen`` and ``rewards/rejected``).
    """
    ratio, _ = log_ratios(policy, reference)
    up = 1 - torch.sigmoid(beta * (ratio - z_ref))
    down = 1 - torch.sigmoid(beta * (z_ref - ratio))
    losses = torch.where(desirable, desirable_weight * up, undesirable_weight * down)
    reward = beta * ratio.detach()
    nan = torch.full_like(reward, float("nan"))
    return LossOutput(losses, torch.where(desirable, reward, nan), torch.where(desirable, nan, reward))
