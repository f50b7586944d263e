"""Schemas made from function signatures: a loss's config keys are its keyword parameters, a
reward's its factory's, so a new loss or reward brings its schema with it (:mod:`dpo.config.schema`
registers them)."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

from omegaconf import MISSING

from dpo.maths.losses import LOSSES, MIXTURE
from dpo.rewards.registry import REWARDS

_SUPPORTED = (int, float, bool, str, bytes, type(None))


def _omegaconf_type(annotation: Any) -> Any:
    """``annotation`` if OmegaConf can type-check it, else ``Any`` (e.g. ``str | int`` unions)."""
    if annotation in _SUPPORTED or annotation is Any:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and _omegaconf_type(rest[0]) is not Any:
            return annotation  # Optional[X]
        return Any
    if origin in (list, dict):
        return annotation
    return Any


def signature_schema(cls_name: str, fn: Callable[..., Any], fixed: dict[str, tuple[Any, Any]], *,
                     keyword_only: bool) -> type:  # fmt: skip
    """A dataclass whose fields are ``fixed`` (name -> (type, default)) and ``fn``'s parameters.

    ``keyword_only``: take only keyword-only parameters (a loss's hyperparameters follow its
    positional log-prob arguments); else every parameter. A parameter without a default is
    required (``???``).
    """
    hints = typing.get_type_hints(fn)
    fields = [(name, kind, field(default=default)) for name, (kind, default) in fixed.items()]
    for p in inspect.signature(fn).parameters.values():
        if (keyword_only and p.kind is not p.KEYWORD_ONLY) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = MISSING if p.default is p.empty else p.default
        fields.append((p.name, _omegaconf_type(hints.get(p.name, Any)), field(default=default)))
    return dataclasses.make_dataclass(cls_name, fields)


def loss_schema(name: str) -> type:
    """``conf/loss/<name>.yaml``'s schema: ``name``, ``nll_weight``, the modifiers every loss takes
    (:data:`dpo.maths.losses.MODIFIERS`) and the loss's hyperparameters; for ``mix``, ``terms`` (loss
    names), ``weights`` (one per term; None: 1 each) and every registered loss's hyperparameters,
    optional (shared by its terms)."""
    fixed = {"name": (str, name), "nll_weight": (float, 0.0), "f_divergence_type": (str, "reverse_kl"),
             "f_alpha_divergence_coef": (float, 0.5), "ld_alpha": (typing.Optional[float], None),  # noqa: UP045
             "use_weighting": (bool, False)}  # fmt: skip
    if name != MIXTURE:
        return signature_schema(f"LossConfig_{name}", LOSSES[name].fn, fixed, keyword_only=True)
    shared = sorted({p for spec in LOSSES.values() for p in spec.param_names})
    fields = [(k, kind, field(default=default)) for k, (kind, default) in fixed.items()]
    fields.append(("terms", typing.List[str], field(default=MISSING)))  # noqa: UP006
    fields.append(("weights", typing.Optional[typing.List[float]], field(default=None)))  # noqa: UP006, UP045
    fields += [(k, typing.Optional[float], field(default=None)) for k in shared]  # noqa: UP045
    return dataclasses.make_dataclass("LossConfig_mix", fields)


def reward_schema(name: str) -> type:
    """``conf/reward/<name>.yaml``'s schema: ``name`` and the reward factory's parameters."""
    return signature_schema(f"RewardConfig_{name}", REWARDS[name], {"name": (str, name)}, keyword_only=False)


