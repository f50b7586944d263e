"""What can change any registered loss: f-divergence scores, LD-DPO's length split, WPO's weights.

Pure functions of per-sequence tensors; the per-token pieces they need (each response's log-probs
past the pair's shared length, WPO's per-token ``log sum_v p_v^2``) are summed per pair by
:func:`dpo.maths.logprobs.scored_logps` when the loss asks (:class:`dpo.maths.losses.registry.Loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.maths.logprobs import PairLogps

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""TRL 1.16's ``f_divergence_type`` values (Wang et al. 2023, arXiv 2309.16240, Table 1)."""


def f_divergence_scores(log_ratio: Tensor, kind: str, alpha: float = 0.5) -> Tensor:
    """f'(u) of the likelihood ratio u = exp(log_ratio), replacing the log-ratio in DPO-style losses
    (f-DPO, Wang et al. 2023, arXiv 2309.16240, Thm. 1 and Table 1), as TRL 1.16 computes it.

    reverse_kl: log u; forward_kl: 1 - 1/u; js_divergence: log 2 + log s(log u) = log(2u / (1 + u));
    alpha_divergence: (u^(alpha - 1) - 1) / (alpha - 1), the exponent clamped at 80 (TRL's fp32
    clamp; TRL also rounds the power to fp32, we keep the log-ratios' own precision) and log u at
    alpha = 1 (its limit).
    """
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        return (torch.exp(((alpha - 1.0) * log_ratio).clamp(max=80.0)) - 1.0) * (1.0 / (alpha - 1.0))
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")


def as_scores(policy: PairLogps, reference: PairLogps, kind: str, alpha: float) -> tuple[PairLogps, PairLogps]:
    """(policy', reference') whose log-ratios are the f-divergence's scores: policy' holds
    ``f'(u)`` in place of the summed log-probs and reference' zeros, lengths kept, so a loss of the
    margin reads the scores where it read the log-ratios (per-token forms divide them by the lengths)."""
    chosen = f_divergence_scores(policy.chosen - reference.chosen, kind, alpha)
    rejected = f_divergence_scores(policy.rejected - reference.rejected, kind, alpha)
    scored = policy._replace(chosen=chosen, rejected=rejected)
    return scored, reference._replace(chosen=torch.zeros_like(chosen), rejected=torch.zeros_like(rejected))


def length_desensitised(logps: PairLogps, alpha: float) -> PairLogps:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411): each response's tokens past the pair's shared
    length ``min(|c|, |r|)`` count ``alpha`` times: ``p = p_shared + alpha * p_tail``, alpha in [0, 1]
    (1: plain summed log-probs). Needs ``chosen_tail`` and ``rejected_tail`` (scored with ``tails``)."""
    if logps.chosen_tail is None or logps.rejected_tail is None:
        raise ValueError("ld_alpha needs each response's log-probs past the shared length (scored with tails=True)")
    return logps._replace(
        chosen=logps.chosen - (1 - alpha) * logps.chosen_tail,
        rejected=logps.rejected - (1 - alpha) * logps.rejected_tail,
    )


def wpo_weights(policy: PairLogps) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, arXiv 2406.11827, Eq. 2, with the aligned per-token
    probabilities ``p_t / sum_v p_v^2`` as TRL 1.16 computes them): ``exp(mean_t [log p_t - log sum_v
    p_v^2])`` of the chosen times that of the rejected response, no gradient. Needs ``wpo_log_weight``
    (scored with ``wpo``)."""
    if policy.wpo_log_weight is None:
        raise ValueError("use_weighting needs the policy's WPO log-weights (scored with wpo=True)")
    return torch.exp(policy.wpo_log_weight.detach())
