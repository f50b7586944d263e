"""Whether a config fits its GPUs, before it waits in a cluster queue: ``dpo-train preflight.enabled=true``.

The preflight composes and validates the config as a run would, builds the model on the meta
device from its ``config.json`` (no weights; ``preflight.model_config`` names one of the shipped
base models in ``dpo/models/architectures`` or a folder, and stands in for a ``model.pretrained``
that is still ``???``), and estimates, per rank:

- parameters, gradients and optimizer state of the trained weights, divided over the ranks when
  the strategy shards (FSDP2), whole on every rank otherwise (DDP);
- the reference by kind: ``copy`` holds a second set of weights (sharded like the policy), ``lora``
  shares the base, ``precomputed`` and ``none`` hold nothing;
- activations kept for backward at the micro-batch and ``data.max_length`` (every row padded to
  it): per layer and token ``c * (9h + 2f)`` bytes (Korthikanti et al. 2022, arXiv 2205.05198,
  Sec. 4.1: ``34sbh`` at ``c = 2`` bytes and ``f = 4h``, less the attention scores SDPA never
  stores, less dropout masks, which are off here), or the layer inputs alone with gradient
  checkpointing, plus one layer recomputed;
- the logits: ``rows x T x V`` in the compute dtype, their fp32 upcast and the fp32 log-softmax
  kept for backward (:mod:`dpo.maths.logprobs`); or, where those exceed a tile, one tile's fp32
  logits, probabilities and gradient (:mod:`dpo.maths.tiled`);
- a fixed reserve (CUDA context, NCCL buffers, allocator fragmentation).

It prints the table, the tokens per optimizer step and a step time at ``preflight.mfu`` of
``preflight.peak_tflops`` (6 FLOPs per parameter and token for the policy's forward and backward, 2
for a reference forward), and refuses, with the numbers, a config whose total exceeds
``preflight.device_gb``. How close the estimate comes to measured peaks: ``experiments/preflight``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dpo.config.settings import ConfigError
from dpo.maths.tiled import is_large, tile_tokens
from dpo.runtime.checks import refuse
from dpo.runtime.log import get_logger

log = get_logger(__name__)
ARCHITECTURES = Path(__file__).parent.parent / "models" / "architectures"
"""The shipped ``config.json`` folders of the paper's base models (see the README there)."""
GB = 1e9
PLACEHOLDER = "<not read by the preflight>"
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "RMSprop": 1, "SGD": 0, "Adagrad": 1, "Adamax": 2, "NAdam": 2, "RAdam": 2}
"""State tensors per parameter of torch's optimizers, before their options (momentum, centered)."""


@dataclass
class PreflightConfig:
    """``preflight``: estimate memory and step time, refuse what cannot fit, train nothing.

    Attributes:
        enabled: run the preflight instead of training.
        device_gb: memory of one device, in GB (1e9 bytes): 80 for an A100/H100 80 GB.
        model_config: the architecture to estimate: a name in ``dpo/models/architectures``
            (``gpt2-large``, ``gpt-j-6b``, ``pythia-2.8b``) or a folder with a ``config.json``; None:
            ``model.pretrained``'s own config.
        peak_tflops: the device's dense peak in the compute dtype (H100 SXM bf16: 989; A100: 312).
        mfu: the fraction of that peak the step-time estimate assumes (0.3-0.5 is typical).
        reserve_gb: memory the estimate sets aside for the CUDA context, NCCL and fragmentation.
    """

    enabled: bool = False
    device_gb: float = 80.0
    model_config: str | None = None
    peak_tflops: float = 989.0
    mfu: float = 0.4
    reserve_gb: float = 3.0

    def __post_init__(self) -> None:
        refuse((("device_gb", self.device_gb, self.device_gb > 0, "> 0"),
                ("peak_tflops", self.peak_tflops, self.peak_tflops > 0, "> 0"),
                ("mfu", self.mfu, 0 < self.mfu <= 1, "in (0, 1]"),
                ("reserve_gb", self.reserve_gb, self.reserve_gb >= 0, ">= 0")), prefix="preflight.")  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameter counts and the transformer's sizes."""

    parameters: int
    trainable: int
    layers: int
    hidden: int
    ffn: int
    vocab: int  # 0 for a classifier (its head has one output)


@dataclass(frozen=True)
class Estimate:
    """Per-rank memory (bytes, by part), tokens per optimizer step and the step time."""

    parts: dict[str, float]
    device_bytes: float
    tokens_per_step: int
    step_flops: float
    step_seconds: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self, title: str) -> str:
        lines = [title] + [f"  {name:<54} {value / GB:8.2f} GB" for name, value in self.parts.items()]
        lines += [f"  {'total per rank':<54} {self.total / GB:8.2f} GB of {self.device_bytes / GB:.0f} GB"
                  f" ({'fits' if self.fits else 'does NOT fit'})",
                  f"  {'tokens per optimizer step':<54} {self.tokens_per_step:,} (rows padded to data.max_length)",
                  f"  {'step time':<54} {self.step_seconds:.2f} s "
                  f"({self.step_flops:.3g} FLOPs)"]  # fmt: skip
        return "\n".join(lines)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes


def dtype_bytes(name: str) -> int:
    return torch.empty((), dtype=getattr(torch, str(name))).element_size()


def optimizer_states(optimizer: dict[str, Any]) -> int:
    """State tensors per trained parameter of ``conf/optim``'s optimizer (2 when it is not torch's)."""
    name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    if name not in OPTIMIZER_STATES:
        log.warning(f"preflight: {optimizer.get('_target_')} is not one of torch's; counting 2 states per parameter")
        return 2
    extra = int(bool(optimizer.get("momentum"))) + int(bool(optimizer.get("centered")))
    return OPTIMIZER_STATES[name] + extra


def model_shape(config: Any, *, classifier: bool, lora: Any = None) -> Shape:
    """Build the model on the meta device (no memory) and read its sizes; ``lora`` (a LoraConfig):
    only the adapter is trained."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if classifier:
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        if lora is not None:
            from dpo.systems.reference import apply_lora

            model = apply_lora(model, lora)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = config.get_text_config()
    hidden = text.hidden_size
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    return Shape(total, trainable, text.num_hidden_layers, hidden, ffn, 0 if classifier else text.vocab_size)


def estimate(cfg: DictConfig, plan: Any, shape: Shape, pf: PreflightConfig, per_example: int) -> Estimate:
    """Per-rank memory of one training step of ``cfg`` (see the module docstring for the model);
    ``plan``: its :class:`dpo.config.validate.Plan` (validate imports the schema, which imports this);
    ``per_example``: sequences one example of the micro-batch becomes (2 for a pair)."""
    precision = plan.precision
    sharded = plan.mesh is not None
    shards = plan.world_size if sharded else 1
    model_dtype = getattr(cfg.model.dtype, "value", cfg.model.dtype)  # a DType enum once typed
    weights = dtype_bytes(precision.weights if precision.precision.endswith("-true") and
                          precision.precision != "32-true" else model_dtype)  # fmt: skip
    compute = dtype_bytes(precision.autocast) if precision.autocast else weights
    rows, length = plan.micro_batch_size * per_example, int(cfg.data.max_length)
    tokens = rows * length
    frozen = shape.parameters - shape.trainable
    parts = {
        "parameters (trained)": shape.trainable * weights / shards,
        "parameters (frozen base)": frozen * weights / shards,
        "gradients": shape.trainable * weights / shards,
        "optimizer state": shape.trainable * weights * optimizer_states(dict(cfg.optim.optimizer)) / shards,
        f"reference ({cfg.reference.kind})": (shape.parameters * dtype_bytes(model_dtype) / shards
                                             if cfg.reference.kind == "copy" else 0.0),  # fmt: skip
    }
    layer_bytes = tokens * compute * (9 * shape.hidden + 2 * shape.ffn)  # one layer's saved activations
    if cfg.model.gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * compute + layer_bytes
    else:
        activations = shape.layers * layer_bytes
    parts[f"activations ({rows} rows x {length} tokens)"] = activations
    if is_large(tokens, shape.vocab):  # dpo.models.forward takes the head in tiles (FSDP2 too)
        tile = tile_tokens(shape.vocab)
        parts[f"logits, in tiles of {tile} tokens (fp32, softmax, grad)"] = tile * shape.vocab * 12
    else:
        parts["logits (model dtype, fp32 copy, log-softmax)"] = tokens * shape.vocab * (compute + 8)
    parts["reserve (CUDA context, NCCL, fragmentation)"] = pf.reserve_gb * GB
    step_tokens = int(cfg.data.batch_size) * per_example * length
    passes = 6 + (2 if cfg.reference.kind in ("copy", "lora") else 0)
    flops = passes * shape.parameters * step_tokens
    seconds = flops / (plan.world_size * pf.peak_tflops * 1e12 * pf.mfu)
    return Estimate(parts, pf.device_gb * GB, step_tokens, flops, seconds)


def architecture_folder(name: str) -> str:
    """A shipped architecture's folder, or ``name`` itself when it is a folder with a ``config.json``."""
    if (ARCHITECTURES / name / "config.json").is_file():
        return str(ARCHITECTURES / name)
    if (Path(name) / "config.json").is_file():
        return name
    shipped = sorted(p.name for p in ARCHITECTURES.iterdir() if (p / "config.json").is_file())
    raise ConfigError(f"preflight.model_config={name!r} is neither one of {shipped} nor a folder with a config.json")


def stand_ins(cfg: DictConfig, pf: PreflightConfig) -> list[str]:
    """Fill what the preflight never reads but validation requires: ``model.pretrained`` (the
    architecture) and ``???`` data splits. Returns what was filled."""
    filled = []
    with open_dict(cfg):
        if pf.model_config is not None:
            cfg.model.pretrained = architecture_folder(pf.model_config)
            filled.append(f"model.pretrained={pf.model_config}")
        elif OmegaConf.is_missing(cfg.model, "pretrained"):
            raise ConfigError("model.pretrained is ??? : give the preflight an architecture with preflight."
                              "model_config=<gpt2-large|gpt-j-6b|pythia-2.8b|a folder with config.json>")  # fmt: skip
        splits = cfg.data.source.splits
        for split in list(splits.keys()) if splits is not None else []:
            if OmegaConf.is_missing(splits, split):
                splits[split] = PLACEHOLDER
                filled.append(f"data.source.splits.{split}")
    return filled
