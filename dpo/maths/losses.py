"""Preference losses as pure functions of per-sequence log-probabilities.

Every loss takes the policy's (and, where it needs one, the reference's) :class:`PairLogps` for a
batch of ``B`` preference pairs and returns a :class:`LossOutput` of (B,) tensors. Variants are
registered in :data:`LOSSES`; ``conf/loss/<name>.yaml`` picks one and sets its parameters. Whether a
variant needs the reference model, or rejected responses at all, is a property of its
:class:`LossSpec`.

Notation used in the docstrings: ``pc, pr`` policy log-probs of chosen/rejected (summed over
response tokens), ``rc, rr`` the reference's, ``|c|, |r|`` response lengths in tokens,
``h = (pc - rc) - (pr - rr)`` the difference of log-ratios, ``s(x) = sigmoid(x)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.maths.logprobs import PairLogps


class LossOutput(NamedTuple):
    """Per-pair losses and implicit rewards.

    Attributes:
        losses: (B,) loss of each pair; the batch loss is their mean.
        chosen_rewards: (B,) implicit reward of the chosen responses, detached; None for SFT.
        rejected_rewards: (B,) the same for the rejected responses; None for SFT.
    """

    losses: Tensor
    chosen_rewards: Tensor | None
    rejected_rewards: Tensor | None


def _ratio_rewards(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``beta * (log pi - log pi_ref)`` on summed log-probs, detached."""
    chosen = beta * (policy.chosen - reference.chosen).detach()
    rejected = beta * (policy.rejected - reference.rejected).detach()
    return chosen, rejected


def _log_ratio_margin(policy: PairLogps, reference: PairLogps) -> Tensor:
    """``h = (pc - rc) - (pr - rr)``, (B,)."""
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """DPO, the sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    loss = -log s(beta * h), rewards = beta * (pc - rc), beta * (pr - rr).
    """
    losses = -F.logsigmoid(beta * _log_ratio_margin(policy, reference))
    return LossOutput(losses, *_ratio_rewards(policy, reference, beta))


def cdpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """Conservative DPO: DPO with labels flipped with probability eps (the official DPO repo's cDPO).

    loss = -(1 - eps) * log s(beta * h) - eps * log s(-beta * h), eps = label_smoothing in [0, 0.5).
    This is the cross-entropy against the smoothed label; it is minimised at a finite margin.
    """
    logits = beta * _log_ratio_margin(policy, reference)
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return LossOutput(losses, *_ratio_rewards(policy, reference, beta))


def robust_dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8): unbiased under label noise eps.

    loss = [(1 - eps) * (-log s(beta * h)) - eps * (-log s(-beta * h))] / (1 - 2 * eps).
    Unlike cDPO the eps-weighted term enters with a minus sign and the sum is rescaled, so the
    expected loss under flipped labels equals the clean DPO loss.
    """
    logits = beta * _log_ratio_margin(policy, reference)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, *_ratio_rewards(policy, reference, beta))


def ipo_sum_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """IPO on summed log-probs (Azar et al. 2023, arXiv 2310.12036, Eq. 17; official DPO repo form).

    loss = (h - 1 / (2 * beta))^2, beta playing the role of the paper's tau.
    """
    losses = (_log_ratio_margin(policy, reference) - 1 / (2 * beta)) ** 2
    return LossOutput(losses, *_ratio_rewards(policy, reference, beta))


def ipo_length_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """IPO on per-token mean log-probs (the length-normalised form TRL's ``ipo`` uses).

    h_norm = (pc - rc) / |c| - (pr - rr) / |r|;  loss = (h_norm - 1 / (2 * beta))^2.
    Rewards are beta * (pc - rc) / |c| and beta * (pr - rr) / |r|.
    """
    chosen_ratio = policy.chosen_mean - reference.chosen_mean
    rejected_ratio = policy.rejected_mean - reference.rejected_mean
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def hinge_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> LossOutput:
    """Hinge loss on the normalised likelihood (SLiC, arXiv 2305.10425; RSO, arXiv 2309.06657).

    loss = max(0, 1 - beta * h).
    """
    losses = torch.relu(1 - beta * _log_ratio_margin(policy, reference))
    return LossOutput(losses, *_ratio_rewards(policy, reference, beta))


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


def sft_loss(policy: PairLogps, reference: None = None) -> LossOutput:
    """Supervised fine-tuning on the chosen response: loss = -pc (summed NLL of the response).

    The batch loss is the mean over sequences of the summed token NLL, as in the official DPO
    repo's SFT trainer; this makes gradient accumulation exactly equal to a larger batch.
    """
    return LossOutput(-policy.chosen, None, None)


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


def nll_term(policy: PairLogps) -> Tensor:
    """Length-normalised NLL of the chosen response, -pc / |c|, (B,) (RPO, arXiv 2404.19733 Eq. 2)."""
    return -policy.chosen_mean


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs from the training system.

    Attributes:
        fn: the pure loss function.
        needs_reference: the frozen reference model must be built and run.
        needs_pairs: batches carry rejected responses (False for SFT).
        needs_unlikelihood: the policy's rejected ``log(1 - p)`` term must be computed
            (:attr:`dpo.maths.logprobs.PairLogps.rejected_unlikely`); no other loss pays for it.
    """

    fn: Callable[..., LossOutput]
    needs_reference: bool
    needs_pairs: bool = True
    needs_unlikelihood: bool = False

    @property
    def param_names(self) -> tuple[str, ...]:
        """Keyword parameters of ``fn`` (its hyperparameters, set in ``conf/loss``)."""
        sig = inspect.signature(self.fn)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, needs_reference=True),
    "cdpo": LossSpec(cdpo_loss, needs_reference=True),
    "robust_dpo": LossSpec(robust_dpo_loss, needs_reference=True),
    "ipo_sum": LossSpec(ipo_sum_loss, needs_reference=True),
    "ipo_length_norm": LossSpec(ipo_length_norm_loss, needs_reference=True),
    "hinge": LossSpec(hinge_loss, needs_reference=True),
    "ref_free_dpo": LossSpec(ref_free_dpo_loss, needs_reference=False),
    "simpo": LossSpec(simpo_loss, needs_reference=False),
    "sft": LossSpec(sft_loss, needs_reference=False, needs_pairs=False),
    "unlikelihood": LossSpec(unlikelihood_loss, needs_reference=False, needs_unlikelihood=True),
}


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss, with the list of valid names in the error."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"loss.name={name!r} is not a registered loss; choose from {sorted(LOSSES)}") from None


def check_loss_params(name: str, params: dict[str, Any], nll_weight: float = 0.0) -> None:
    """Raise ``ValueError`` naming the key when ``params`` don't match the loss's hyperparameters, or
    the weight of the NLL term (RPO) is negative."""
    if not nll_weight >= 0:  # a negative weight rewards a worse likelihood of the chosen response
        raise ValueError(f"loss.nll_weight must be >= 0, got {nll_weight}")
    spec = get_loss(name)
    expected = set(spec.param_names)
    unknown = sorted(set(params) - expected)
    missing = sorted(expected - set(params))
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter(s) {unknown} (its parameters: {sorted(expected)})")
    if missing:
        raise ValueError(f"loss {name!r} needs parameter(s) {missing} in the loss config")
    if "beta" in params and not params["beta"] > 0:
        raise ValueError(f"loss.beta must be > 0, got {params['beta']}")
    if "alpha" in params and not params["alpha"] >= 0:
        raise ValueError(f"loss.alpha must be >= 0, got {params['alpha']}")
    eps = params.get("label_smoothing")
    if eps is not None and not 0 <= eps < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {eps}")


def compute_loss(
    name: str,
    policy: PairLogps,
    reference: PairLogps | None,
    params: dict[str, Any],
    nll_weight: float = 0.0,
) -> LossOutput:
    """Apply the registered loss ``name``, plus ``nll_weight`` times :func:`nll_term` (RPO).

    Args:
        name: a key of :data:`LOSSES`.
        policy: the policy's log-probs.
        reference: the reference's log-probs, or None for a loss that needs none.
        params: the loss's hyperparameters (e.g. ``{"beta": 0.1}``).
        nll_weight: weight alpha of the chosen-response NLL added to every pair's loss.
    """
    spec = get_loss(name)
    if spec.needs_reference and reference is None:
        raise ValueError(f"loss {name!r} needs reference log-probs")
    out = spec.fn(policy, reference, **params)
    if nll_weight:
        out = out._replace(losses=out.losses + nll_weight * nll_term(policy))
    return out
