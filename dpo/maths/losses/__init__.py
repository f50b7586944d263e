"""Preference losses as pure functions of per-sequence log-probabilities, in one registry.

Every loss takes the policy's (and, where it needs one, the reference's) :class:`PairLogps` for a
batch of ``B`` preference pairs and returns a :class:`LossOutput` of (B,) tensors. Where they live:
:mod:`~dpo.maths.losses.pairwise` (losses of the log-ratio margin: DPO and its variants),
:mod:`~dpo.maths.losses.pointwise` (each response's own log-ratio), :mod:`~dpo.maths.losses.reference_free`
(SFT, Unlikelihood, SimPO, CPO, ORPO), :mod:`~dpo.maths.losses.modifiers` (f-divergences, LD-DPO,
WPO) and :mod:`~dpo.maths.losses.registry` (names, TRL's aliases, mixtures, :class:`Loss`).
"""

from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput, LossSpec
from dpo.maths.losses.reference_free import nll_term
from dpo.maths.losses.registry import (
    ALIASES,
    LOSSES,
    MIXTURE,
    MODIFIERS,
    Loss,
    check_loss_params,
    compute_loss,
    get_loss,
)

__all__ = ["ALIASES", "LOSSES", "MIXTURE", "MODIFIERS", "Loss", "LossOutput", "LossSpec", "PairLogps",
           "check_loss_params", "compute_loss", "get_loss", "nll_term"]  # fmt: skip
