"""What every preference loss returns and declares, and the log-ratio helpers they share.

Notation of every loss's docstring: ``pc, pr`` the policy's log-probs of the chosen/rejected
response (summed over its tokens), ``rc, rr`` the reference's, ``|c|, |r|`` response lengths in
tokens, ``lc = pc - rc`` and ``lr = pr - rr`` the log-ratios, ``h = lc - lr``, ``s(x) = sigmoid(x)``.
Shapes: ``B`` pairs; every tensor here is (B,).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

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


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs from the training system.

    Attributes:
        fn: the pure loss function ``fn(policy, reference, **params) -> LossOutput``.
        needs_reference: the frozen reference model must be built and run.
        needs_pairs: batches carry rejected responses (False for SFT).
        needs_unlikelihood: the policy's rejected ``log(1 - p)`` term must be computed
            (:attr:`dpo.maths.logprobs.PairLogps.rejected_unlikely`); no other loss pays for it.
        f_divergence: the loss reads the log-ratios only through the margin, so an
            ``f_divergence_type`` may replace them by its scores (or it reads no log-ratio at all:
            the SFT terms); TRL 1.16 allows the same set.
        batch_coupled: one pair's loss depends on the other pairs of the (micro-)batch (AOT sorts
            the batch; the token-mean SFT divides by the batch's tokens), so gradient accumulation
            and DDP give per-micro-batch values, as in TRL.
        check: extra range checks of the parameters: returns a message for a bad value, else None.
    """

    fn: Callable[..., LossOutput]
    needs_reference: bool
    needs_pairs: bool = True
    needs_unlikelihood: bool = False
    f_divergence: bool = False
    batch_coupled: bool = False
    check: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        """Keyword parameters of ``fn`` (its hyperparameters, set in ``conf/loss``)."""
        sig = inspect.signature(self.fn)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


def log_ratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """``lc = pc - rc`` and ``lr = pr - rr``, each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def ratio_margin(policy: PairLogps, reference: PairLogps) -> Tensor:
    """``h = (pc - rc) - (pr - rr)``, (B,)."""
    chosen, rejected = log_ratios(policy, reference)
    return chosen - rejected


def ratio_rewards(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``beta * lc``, ``beta * lr`` on summed log-probs, detached."""
    chosen, rejected = log_ratios(policy, reference)
    return beta * chosen.detach(), beta * rejected.detach()
