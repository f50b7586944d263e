"""What the trainer's precision and strategy decide, in one place, before any weights load.

:func:`plan_precision` reads ``trainer.precision``, the accelerator, whether the strategy shards,
the clipping norm and the optimizer's options, and returns a :class:`PrecisionPlan`: the weights'
dtype in training, the autocast dtype, whether a gradient scaler runs, and the optimizer options
that depend on all of them. Everything else asks the plan: the low-precision update guard
(:func:`check_update_precision`) and the optimizer the systems build
(:meth:`PrecisionPlan.optimizer_options`).

The decision it exists for (lightning 2.6.6, torch 2.13): a ``fused`` optimizer (AdamW's one
kernel for every parameter; torch marks it ``_step_supports_amp_scaling``) unscales gradients
inside its own ``step``. Lightning's mixed-precision plugin (``16-mixed`` and ``bf16-mixed``,
also under DDP and FSDP2's ``ModelParallelStrategy``) therefore refuses to clip its gradients
(``RuntimeError: ... does not allow for gradient clipping``), whether or not a scaler runs. With
clipping on (``trainer.gradient_clip_val > 0``, the default: 10, as the official DPO repo), a mixed
precision run gets the unfused optimizer, so Lightning unscales (fp16) and clips as usual. Without
clipping, or in ``32-true`` and ``*-true`` (Lightning's plain and half-precision plugins clip any
optimizer), ``fused`` stays as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo.config.settings import ConfigError

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
"""Lightning's precision names this project runs (``transformer-engine*`` are passed through)."""
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
"""Lightning's short names (``trainer.precision=bf16`` means ``bf16-mixed``)."""
PASS_THROUGH = ("transformer-engine", "transformer-engine-float16")


class PrecisionError(ValueError):
    """A precision the trainer would refuse, or silently change, named with its fix."""


@dataclass(frozen=True)
class PrecisionPlan:
    """What a run's precision means for its weights, its compute and its optimizer.

    Attributes:
        precision: Lightning's full name (``bf16-mixed``, never the alias ``bf16``).
        weights: dtype of the trained weights during training: ``float32`` (``*-mixed``,
            ``32-true``), ``bfloat16``/``float16`` (``*-true``: Lightning casts the model).
        autocast: dtype of the forward's matmuls under autocast (``*-mixed``), else None.
        grad_scaler: a ``GradScaler`` scales the loss (``16-mixed``): gradients are unscaled before
            clipping and a step with inf/NaN gradients is skipped by the scaler.
        fused: the optimizer's ``fused`` option after the decision (None: the optimizer has none).
        note: why ``fused`` differs from the config, for the run's log (None: it doesn't).
    """

    precision: str
    weights: str
    autocast: str | None
    grad_scaler: bool
    fused: bool | None
    note: str | None = None

    def optimizer_options(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """The ``conf/optim`` optimizer node with the decided options."""
        if self.fused is None or "fused" not in optimizer:
            return dict(optimizer)
        return dict(optimizer) | {"fused": self.fused}


def unified(precision: Any) -> str:
    """Lightning's full precision name for ``precision`` (an alias, an int or a full name)."""
    name = ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS + PASS_THROUGH:
        raise PrecisionError(f"trainer.precision={precision!r} is not a Lightning precision; use one of {PRECISIONS}")
    return name


def on_cpu(accelerator: Any) -> bool:
    """Whether Lightning will run on the CPU (``auto`` picks CUDA only when a device is visible)."""
    return str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.cuda.is_available())


def plan_precision(
    precision: Any, *, accelerator: Any, sharded: bool, clip: float | None, optimizer: dict[str, Any]
) -> PrecisionPlan:
    """Decide what ``trainer.precision`` means for this run (see the module docstring).

    Args:
        precision: ``trainer.precision``.
        accelerator: ``trainer.accelerator`` (``cpu``, ``gpu``, ``cuda``, ``auto``).
        sharded: the strategy shards parameters (FSDP2's ``ModelParallelStrategy``).
        clip: ``trainer.gradient_clip_val`` (None or 0: no clipping).
        optimizer: the ``conf/optim`` optimizer node (its ``fused`` key, if any).

    Raises:
        PrecisionError: ``16-mixed`` on a CPU (Lightning would silently run ``bf16-mixed``) or under
            FSDP2 (Lightning refuses it after the weights load), or an unknown precision.
    """
    name = unified(precision)
    if name == "16-mixed" and on_cpu(accelerator):
        raise PrecisionError(
            "trainer.precision=16-mixed on a CPU: Lightning 2.6 would silently train in bf16-mixed instead "
            "(CPU autocast has no fp16 loss scaling); say trainer.precision=bf16-mixed"
        )
    if name == "16-mixed" and sharded:
        raise PrecisionError(
            "trainer.precision=16-mixed under FSDP2 (ModelParallelStrategy): Lightning supports 32-true, "
            "bf16-mixed, bf16-true and 16-true there; use trainer.precision=bf16-mixed"
        )
    mixed = name.endswith("-mixed")
    weights = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}.get(name, "float32")
    autocast = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(name)
    requested = optimizer.get("fused")
    fused, note = (None if requested is None else bool(requested)), None
    if mixed and fused and clip:
        fused = False
        note = (
            f"optim.optimizer.fused=true turned off: trainer.precision={name} clips gradients "
            f"(trainer.gradient_clip_val={clip:g}) and Lightning cannot clip a fused optimizer's gradients"
        )
    return PrecisionPlan(name, weights, autocast, grad_scaler=name == "16-mixed", fused=fused, note=note)


# Relative spacing of representable numbers (machine epsilon) of the low-precision weight dtypes.
WEIGHT_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}
TYPICAL_WEIGHT = 0.02
"""Magnitude of a typical transformer weight (GPT-2/GPT-J/Pythia initialise at std 0.02 and trained
weights stay near it): the scale at which the rounding check asks whether an update registers."""


def check_update_precision(cfg: Any, precision: PrecisionPlan) -> None:
    """Refuse pure bf16/fp16 weights when the learning rate is too small for updates to register.

    Adaptive optimizers (Adam, RMSprop) move a weight by about ``lr`` per step. A weight ``w`` stored
    in a dtype with machine epsilon ``eps`` changes only if the update exceeds half its spacing,
    ``|w| * eps / 2``; at ``|w| = 0.02`` that is 7.8e-5 in bf16 and 9.8e-6 in fp16. Below it most
    weights never move (measured: 87% of bf16 weights of scale 0.02 unchanged after 3 RMSprop steps
    at lr 1e-6, the paper's TL;DR setting). Float32 master weights with ``trainer.precision=bf16-mixed``
    compute in bf16 and keep every update.

    The weights are low-precision when ``model.dtype`` says so, or when ``trainer.precision`` is
    ``bf16-true``/``16-true`` (Lightning casts the model, whatever ``model.dtype`` is); ``precision``
    is the run's plan (:func:`dpo.config.validate.precision_plan`).

    Raises:
        ConfigError: naming the setting that made the weights low-precision and the fix.
    """
    dtype = getattr(cfg.model.get("dtype"), "value", cfg.model.get("dtype"))
    where = f"model.dtype={dtype}"
    if precision.weights in WEIGHT_EPS:
        dtype, where = precision.weights, f"trainer.precision={precision.precision}"
    lr = cfg.optim.optimizer.get("lr")
    if dtype not in WEIGHT_EPS or not isinstance(lr, int | float) or cfg.guard.get("low_precision") == "allow":
        return
    smallest = TYPICAL_WEIGHT * WEIGHT_EPS[dtype] / 2
    if lr < smallest:
        raise ConfigError(
            f"{where} with optim.optimizer.lr={lr:g}: {dtype} weights; an update of about lr moves a weight of size "
            f"{TYPICAL_WEIGHT} only if lr > {smallest:.1e}, so most updates round away and the weights barely train. "
            f"Keep float32 master weights and compute in {dtype}: model.dtype=float32 "
            f"trainer.precision={'bf16' if dtype == 'bfloat16' else '16'}-mixed (or guard.low_precision=allow)"
        )
