"""The registry of losses, TRL's names for them, and :class:`Loss`: one run's choice, applied.

``conf/loss/<name>.yaml`` picks a registered loss (or ``mix``, a weighted sum of them: ``terms``
and ``weights``, TRL's ``loss_type`` and ``loss_weights`` lists, e.g. MPO) and sets its parameters and the modifiers any
loss takes (``f_divergence_type``, ``ld_alpha``, ``use_weighting``; TRL 1.16's names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dpo.maths.losses.modifiers as modifiers
import dpo.maths.losses.pairwise as pairwise
import dpo.maths.losses.pointwise as pointwise
import dpo.maths.losses.reference_free as reference_free
from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.base import LossOutput, LossSpec


def _eps_open(params: dict[str, Any]) -> str | None:
    eps = params.get("label_smoothing")
    return None if eps is None or 0 < eps < 0.5 else f"label_smoothing must be in (0, 0.5) for EXO (log eps), got {eps}"


def _tau_positive(params: dict[str, Any]) -> str | None:
    tau = params.get("tau")
    return None if tau is None or tau > 0 else f"tau must be > 0, got {tau}"


_REF = {"needs_reference": True}
LOSSES: dict[str, LossSpec] = {
    # the log-ratio margin (f-divergences apply)
    "dpo": LossSpec(pairwise.dpo_loss, **_REF, f_divergence=True),
    "cdpo": LossSpec(pairwise.cdpo_loss, **_REF, f_divergence=True),
    "robust_dpo": LossSpec(pairwise.robust_dpo_loss, **_REF, f_divergence=True),
    "ipo_sum": LossSpec(pairwise.ipo_sum_loss, **_REF, f_divergence=True),
    "ipo_length_norm": LossSpec(pairwise.ipo_length_norm_loss, **_REF, f_divergence=True),
    "sigmoid_norm": LossSpec(pairwise.sigmoid_norm_loss, **_REF, f_divergence=True),
    "hinge": LossSpec(pairwise.hinge_loss, **_REF, f_divergence=True),
    "exo_pair": LossSpec(pairwise.exo_pair_loss, **_REF, f_divergence=True, check=_eps_open),
    "discopop": LossSpec(pairwise.discopop_loss, **_REF, f_divergence=True, check=_tau_positive),
    "aot": LossSpec(pairwise.aot_loss, **_REF, batch_coupled=True),
    "aot_unpaired": LossSpec(pairwise.aot_unpaired_loss, **_REF, batch_coupled=True),
    # each response's own log-ratio
    "nca_pair": LossSpec(pointwise.nca_pair_loss, **_REF),
    "bco_pair": LossSpec(pointwise.bco_pair_loss, **_REF),
    "sppo_hard": LossSpec(pointwise.sppo_hard_loss, **_REF),
    "apo_zero": LossSpec(pointwise.apo_zero_loss, **_REF),
    "apo_down": LossSpec(pointwise.apo_down_loss, **_REF),
    # no reference model
    "ref_free_dpo": LossSpec(reference_free.ref_free_dpo_loss, needs_reference=False),
    "simpo": LossSpec(reference_free.simpo_loss, needs_reference=False),
    "cpo": LossSpec(reference_free.cpo_loss, needs_reference=False, batch_coupled=True),
    "orpo": LossSpec(reference_free.orpo_loss, needs_reference=False, batch_coupled=True),
    "sft": LossSpec(reference_free.sft_loss, needs_reference=False, needs_pairs=False, f_divergence=True),
    "sft_token_mean": LossSpec(reference_free.sft_token_mean_loss, needs_reference=False, needs_pairs=False,
                               f_divergence=True, batch_coupled=True),  # fmt: skip
    "unlikelihood": LossSpec(reference_free.unlikelihood_loss, needs_reference=False, needs_unlikelihood=True),
}

ALIASES = {"sigmoid": "dpo", "robust": "robust_dpo", "ipo": "ipo_length_norm"}
"""TRL 1.16's ``loss_type`` names for losses registered under ours. TRL's ``sft`` (a token mean) is
our ``sft_token_mean``: the name ``sft`` is the summed NLL the SFT stage trains with."""

MIXTURE = "mix"
"""``loss.name`` of a weighted sum of registered losses (``loss.terms``, ``loss.weights``)."""

MODIFIERS: dict[str, Any] = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
                             "ld_alpha": None, "use_weighting": False}  # fmt: skip
"""Keys every loss config has besides its parameters, with their defaults (TRL 1.16's names and defaults)."""


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss by our name or TRL's (:data:`ALIASES`), with the valid names in the error."""
    try:
        return LOSSES[ALIASES.get(name, name)]
    except KeyError:
        names = sorted(LOSSES) + sorted(ALIASES) + [MIXTURE]
        raise KeyError(f"loss.name={name!r} is not a registered loss; choose from {names}") from None


def _check_range(params: dict[str, Any]) -> list[str]:
    """The ranges of the parameters several losses share."""
    bad = []
    if "beta" in params and not params["beta"] > 0:
        bad.append(f"loss.beta must be > 0, got {params['beta']}")
    if "alpha" in params and not params["alpha"] >= 0:
        bad.append(f"loss.alpha must be >= 0, got {params['alpha']}")
    eps = params.get("label_smoothing")
    if eps is not None and not 0 <= eps < 0.5:
        bad.append(f"loss.label_smoothing must be in [0, 0.5), got {eps}")
    return bad


@dataclass(frozen=True)
class Loss:
    """One run's loss: weighted registered terms, their parameters, the RPO NLL term and the modifiers.

    Attributes:
        terms: (registered name, weight) of each term; one term of weight 1 unless ``mix``.
        params: each term's parameters (only those its function takes).
        nll_weight: weight of the chosen response's length-normalised NLL (RPO), added to every pair.
        f_divergence: TRL's ``f_divergence_type``; the margin losses read its scores (f-DPO).
        f_alpha: ``f_alpha_divergence_coef``, the alpha of ``alpha_divergence``.
        ld_alpha: LD-DPO's weight of the tokens past the shared length; None: plain sums.
        wpo: weight each pair by WPO's weights (``use_weighting``).
    """

    terms: tuple[tuple[str, float], ...]
    params: tuple[dict[str, Any], ...]
    nll_weight: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    ld_alpha: float | None = None
    wpo: bool = False
    specs: tuple[LossSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(LOSSES[name] for name, _ in self.terms))

    @classmethod
    def of(cls, name: str, params: dict[str, Any], nll_weight: float = 0.0) -> Loss:
        """The loss ``conf/loss`` describes: ``name`` (ours, TRL's or ``mix``) and every other key
        but ``nll_weight``; raises ``ValueError`` listing every mistake (names, keys, ranges)."""
        params = dict(params)
        mods = {key: params.pop(key, default) for key, default in MODIFIERS.items()}
        bad = [] if nll_weight >= 0 else [f"loss.nll_weight must be >= 0, got {nll_weight}"]
        if name == MIXTURE:
            names, weights = list(params.pop("terms", None) or []), params.pop("weights", None)
            weights = [1.0] * len(names) if weights is None else list(weights)
            if not names or len(weights) != len(names):
                bad.append(f"loss.name=mix needs loss.terms (loss names) and as many loss.weights (or none: 1 each); "
                           f"got {len(names)} terms and {len(weights)} weights")
            shared = {k: v for k, v in params.items() if v is not None}
        else:
            names, weights, shared = [name], [1.0], params
        terms, term_params, used = [], [], set()
        for term, weight in zip(names, weights, strict=False):
            try:
                spec = get_loss(term)
            except KeyError as e:
                bad.append(str(e.args[0]) if name != MIXTURE else f"loss.terms: {term!r} is not a registered loss")
                continue
            if not weight >= 0:
                bad.append(f"loss.weights: {term} needs a weight >= 0, got {weight}")
            missing = [k for k in spec.param_names if k not in shared]
            if missing:
                bad.append(f"loss {term!r} needs parameter(s) {missing} in the loss config")
            if spec.check is not None and (message := spec.check(shared)):
                bad.append(f"loss {term!r}: {message}")
            used |= set(spec.param_names)
            terms.append((ALIASES.get(term, term), float(weight)))
            term_params.append({k: shared[k] for k in spec.param_names if k in shared})
        if unknown := sorted(set(shared) - used):
            bad.append(f"loss {name!r} has no parameter(s) {unknown} (its parameters: {sorted(used)})")
        bad += _check_range(shared) + _check_modifiers(mods, [(t, LOSSES[t]) for t, _ in terms])
        if bad:
            raise ValueError("; ".join(bad))
        return cls(tuple(terms), tuple(term_params), nll_weight, mods["f_divergence_type"],
                   mods["f_alpha_divergence_coef"], mods["ld_alpha"], bool(mods["use_weighting"]))  # fmt: skip

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.specs)

    @property
    def needs_pairs(self) -> bool:
        return any(s.needs_pairs for s in self.specs)

    @property
    def needs_unlikelihood(self) -> bool:
        return any(s.needs_unlikelihood for s in self.specs)

    @property
    def needs_tails(self) -> bool:
        """Each response's log-probs past the pair's shared length must be scored (LD-DPO)."""
        return self.ld_alpha is not None

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        """Per-pair losses and rewards (those of the first term that has rewards)."""
        if self.needs_reference and reference is None:
            raise ValueError(f"loss {self.terms[0][0]!r} needs reference log-probs")
        plain = policy
        if self.ld_alpha is not None:
            policy = modifiers.length_desensitised(policy, self.ld_alpha)
            reference = None if reference is None else modifiers.length_desensitised(reference, self.ld_alpha)
        scored = None
        if self.f_divergence != "reverse_kl" and reference is not None:
            scored = modifiers.as_scores(policy, reference, self.f_divergence, self.f_alpha)
        total, rewards = 0.0, (None, None)
        for (_, weight), spec, params in zip(self.terms, self.specs, self.params, strict=True):
            ref = reference if spec.needs_reference else None
            out = spec.fn(policy, ref, **params)
            if scored is not None and spec.needs_reference:  # it reads the scores; its rewards stay the log-ratios'
                out = out._replace(losses=spec.fn(*scored, **params).losses)
            total = total + weight * out.losses
            if rewards[0] is None and out.chosen_rewards is not None:
                rewards = (out.chosen_rewards, out.rejected_rewards)
        if self.wpo:
            total = total * modifiers.wpo_weights(policy)
        if self.nll_weight:
            total = total + self.nll_weight * reference_free.nll_term(plain)
        return LossOutput(total, *rewards)


def _check_modifiers(mods: dict[str, Any], terms: list[tuple[str, LossSpec]]) -> list[str]:
    """What is wrong with the modifier keys for these (name, spec) terms."""
    bad, specs = [], [spec for _, spec in terms]
    kind = mods["f_divergence_type"]
    if kind not in modifiers.F_DIVERGENCES:
        bad.append(f"loss.f_divergence_type must be one of {list(modifiers.F_DIVERGENCES)}, got {kind!r}")
    elif kind != "reverse_kl" and (refused := [n for n, spec in terms if not spec.f_divergence]):
        bad.append(f"loss.f_divergence_type={kind} applies to losses of the log-ratio margin only, not {refused}")
    if (mods["ld_alpha"] is not None or mods["use_weighting"]) and not any(s.needs_pairs for s in specs):
        bad.append("loss.ld_alpha and loss.use_weighting weigh pairs; this loss trains on chosen responses only")
    ld = mods["ld_alpha"]
    if ld is not None and not 0 <= ld <= 1:
        bad.append(f"loss.ld_alpha must be in [0, 1] (or null), got {ld}")
    if mods["use_weighting"] and any(s.batch_coupled and s.needs_reference for s in specs):
        bad.append("loss.use_weighting does not apply to AOT (it sorts the batch; TRL 1.16 refuses it too)")
    return bad


def check_loss_params(name: str, params: dict[str, Any], nll_weight: float = 0.0) -> None:
    """Raise ``ValueError`` naming every key of ``conf/loss`` that is wrong (see :meth:`Loss.of`)."""
    Loss.of(name, params, nll_weight)


def compute_loss(name: str, policy: PairLogps, reference: PairLogps | None, params: dict[str, Any],
                 nll_weight: float = 0.0) -> LossOutput:  # fmt: skip
    """Apply the loss ``name`` with ``params`` (and the modifiers among them): :meth:`Loss.of`, then call."""
    return Loss.of(name, params, nll_weight)(policy, reference)
