"""Linear layers on oneDNN-packed weights while a CPU decodes.

A decode step on a CPU is mostly matrix products of a few rows against every weight. PyTorch's
``nn.Linear`` reads each weight in its stored layout every step; oneDNN runs the same products
faster on weights reordered once into its blocked layout (what inductor's freezing does on a CPU).
While weights stay fixed (sampling), :func:`packed_linears` reorders every ``nn.Linear`` (and
GPT-2's ``Conv1D``) weight of a model once and routes its forward through oneDNN; leaving the
block restores the layers.

Where it applies: fp32 or bf16 weights on the CPU, plain tensors (not FSDP2's DTensor shards),
outside autocast (under autocast ``nn.Linear`` multiplies in the autocast dtype; the packed product
would not), with PyTorch built with oneDNN. Anywhere else (GPUs included) the block does nothing.
Cost: a second copy of the linear weights for the block's duration. ``DPO_PACKED_WEIGHTS=0`` turns
it off. Numbers: the same products by another kernel, so logits differ from ``nn.Linear``'s by
float rounding (the greedy tokens of ``tests/test_sampling.py`` equal ``generate``'s with it on).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENABLED = os.environ.get("DPO_PACKED_WEIGHTS", "1") != "0"


def _is_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layers, weight stored (in, out))."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _packable(model: nn.Module) -> list[nn.Module]:
    if not ENABLED or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
        return []
    layers = [m for m in model.modules() if _is_linear(m)]
    dtypes = (torch.float32, torch.bfloat16)
    fits = all(type(m.weight.data) is Tensor and m.weight.device.type == "cpu" and m.weight.dtype in dtypes
               for m in layers)  # fmt: skip
    return layers if fits else []


@contextmanager
def packed_linears(model: nn.Module, rows: int) -> Iterator[bool]:
    """Within the block, every ``nn.Linear`` (and GPT-2's ``Conv1D``) of ``model`` multiplies with
    its weight packed for oneDNN (``rows``: the expected rows per product, a layout hint). Yields
    whether it did (see the module docstring for where it applies)."""
    layers = _packable(model)
    patched: list[nn.Module] = []
    try:
        for layer in layers:
            weight = layer.weight.detach() if isinstance(layer, nn.Linear) else layer.weight.detach().T.contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            layer.forward = _forward(packed, weight, layer.bias)
            patched.append(layer)
    except (RuntimeError, AttributeError) as err:  # an op this build lacks: the plain layers
        log.debug("oneDNN weight packing unavailable (%s); decoding with the plain layers", err)
        for layer in patched:
            del layer.forward
        patched = []
    try:
        yield bool(patched)
    finally:
        for layer in patched:
            del layer.forward


def _forward(packed: Tensor, weight: Tensor, bias: Tensor | None):
    """The layer's forward on the packed weight; ``weight`` (out, in) as nn.Linear's."""
    bias = None if bias is None else bias.detach()

    def forward(x: Tensor) -> Tensor:
        if x.dtype != weight.dtype or x.device != weight.device:  # as nn.Linear would (its error, if any)
            return nn.functional.linear(x, weight, bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])

    return forward
