"""Per-token log-probs through the LM head in tiles, without the (tokens, V) logits in memory.

A modern vocabulary (128k-152k entries) makes the logits the largest tensor of a step: ``M``
scored tokens hold ``M x V`` logits in the compute dtype, their fp32 upcast and the fp32
log-softmax that backward keeps. :func:`tiled_logps` computes ``log p(target)`` of each token
tile by tile (``tile_tokens(V)`` tokens at a time): each tile's logits are made from the hidden
states and the head's weight, reduced to one log-sum-exp and one target logit per token, and
dropped. Backward recomputes each tile's logits and softmax from the saved hidden states, weight
and log-sum-exps (the gradient of ``log p(y)`` with respect to the logits is ``onehot(y) - p``), so
the peak holds one tile's logits instead of all of them. The same idea as TRL 1.16's fused LM
head (``trl/trainer/utils.py``) and Liger's fused linear cross-entropy.

Numbers: each tile's logits are the same matmul as the head's on those rows, then a fp32
log-softmax, so per-token log-probs agree with :func:`dpo.maths.logprobs.target_logps` of the full
logits to rounding (the tests hold them to 1e-6 relative in fp32); the weight's gradient sums the
tiles' contributions in tile order, so it too differs from the full product's only by summation
order. Under autocast the tile's matmuls run in the autocast dtype, as ``nn.Linear``'s would.

Shapes: ``M`` tokens, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TILE_ELEMENTS = int(os.environ.get("DPO_TILE_ELEMENTS", 1 << 25))
"""Logit entries per tile (32M: 128 MB in fp32): ``V = 128k`` gives 256 tokens per tile; logits
larger than one tile are computed in tiles. The environment variable ``DPO_TILE_ELEMENTS`` sets it
(smaller: leaner steps; the tests set it small to run the tiles on tiny models)."""


def tile_tokens(vocab: int) -> int:
    """Tokens per tile for a vocabulary of ``vocab`` entries."""
    return max(1, TILE_ELEMENTS // vocab)


@dataclass
class HeadInputs:
    """What the LM head would turn into logits, kept instead of the logits.

    Attributes:
        hidden: (..., H) last hidden states at the scored positions.
        weight: (V, H) the head's weight (the output embedding).
        bias: (V,) the head's bias, or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the logits would have: (..., V)."""
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    def detach(self) -> HeadInputs:
        return HeadInputs(self.hidden.detach(), self.weight.detach(), None if self.bias is None else self.bias.detach())

    def logits(self, start: int, stop: int) -> Tensor:
        """fp32 logits (stop - start, V) of flattened tokens ``start:stop``, in the compute dtype's matmul."""
        return _tile_logits(self.hidden.reshape(-1, self.hidden.shape[-1])[start:stop], self.weight, self.bias)


def _compute_dtype(t: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _tile_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(m, H) hidden -> fp32 (m, V) logits, with the matmul in the compute dtype (as nn.Linear under autocast)."""
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()


class _TiledLogps(torch.autograd.Function):
    """log p(target) per token from hidden states and the head, tile by tile, forward and backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tile: int) -> Tensor:
        m = hidden.shape[0]
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, m, tile):
            logits = _tile_logits(hidden[start : start + tile], weight, bias)  # (t, V) fp32
            lse[start : start + tile] = torch.logsumexp(logits, -1)
            chosen = logits.gather(1, targets[start : start + tile, None]).squeeze(1)
            logps[start : start + tile] = chosen - lse[start : start + tile]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.tile, ctx.dtype = tile, _compute_dtype(hidden)
        return logps

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], ctx.tile):
                stop = start + ctx.tile
                h = hidden[start:stop].to(dtype)
                g = F.linear(h, w, None if bias is None else bias.to(dtype)).float()  # (t, V) the logits again
                # d log p(y) / d logits = onehot(y) - softmax, times the incoming gradient u of each token;
                # in place over the tile: -u * exp(logits - lse), then +u at the target
                u = grad[start:stop, None]
                g.sub_(lse[start:stop, None]).exp_().mul_(-u)
                g.scatter_add_(1, targets[start:stop, None], u.to(g.dtype))
                gc = g.to(dtype)
                if need_h:
                    if dtype == hidden.dtype:
                        torch.mm(gc, w, out=grad_h[start:stop])
                    else:
                        grad_h[start:stop] = (gc @ w).to(hidden.dtype)
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(gc.T, h)
                    else:
                        grad_w += (gc.T @ h).float()
                if need_b:
                    grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)  # fmt: skip


def tiled_logps(head: HeadInputs, targets: Tensor, tile: int | None = None) -> Tensor:
    """log p(target) of each token, fp32, shaped like ``targets``, with gradients to the hidden
    states and the head; the logits exist one tile at a time (see the module docstring)."""
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])  # (M, H)
    flat = targets.reshape(-1)
    if hidden.shape[0] != flat.shape[0]:
        raise ValueError(f"hidden {tuple(head.hidden.shape)} and targets {tuple(targets.shape)} disagree on the tokens")
    tile = tile or tile_tokens(head.weight.shape[0])
    return _TiledLogps.apply(hidden, head.weight, head.bias, flat, tile).view(targets.shape)


@torch.no_grad()
def logps_and_kl(head: Tensor | HeadInputs, targets: Tensor, against: Tensor | HeadInputs, tile: int | None = None
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """log p(target) under ``head`` (the reference, q) and the exact KL(p || q) of ``against`` (the
    policy, p) on the same tokens, fp32, no gradient, each shaped like ``targets``: one loop, each
    tile's reference logits made once for both. ``KL = sum_v p_v (a_v - b_v) - lse(a) + lse(b)``
    with ``a``, ``b`` the logits of p and q."""
    flat = targets.reshape(-1)
    tile = tile or tile_tokens(head.shape[-1])
    logps = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    kl = torch.empty_like(logps)
    for start in range(0, flat.shape[0], tile):
        stop = start + tile
        b = _rows(head, start, stop)  # (t, V) reference logits
        a = _rows(against, start, stop)  # (t, V) policy logits
        lse_b, lse_a = torch.logsumexp(b, -1), torch.logsumexp(a, -1)
        if isinstance(head, HeadInputs):  # as tiled_logps computes the policy's
            logps[start:stop] = b.gather(1, flat[start:stop, None]).squeeze(1) - lse_b
        else:  # as target_logps computes the policy's from logits: equal log-probs give a loss of exactly ln 2
            logps[start:stop] = -F.cross_entropy(b, flat[start:stop], reduction="none")
        p = torch.softmax(a, -1)
        kl[start:stop] = torch.linalg.vecdot(p, a - b) - lse_a + lse_b
    return logps.view(targets.shape), kl.view(targets.shape)


def _rows(x: Tensor | HeadInputs, start: int, stop: int) -> Tensor:
    """fp32 logits of flattened tokens ``start:stop`` of full logits or of a head's inputs."""
    if isinstance(x, HeadInputs):
        return x.logits(start, stop)
    return x.reshape(-1, x.shape[-1])[start:stop].float()


def is_large(tokens: int, vocab: int) -> bool:
    """Whether ``tokens x vocab`` logits exceed one tile: where tiling saves memory. A smaller
    batch takes the full logits (one tile would recompute the head's matmul in backward for nothing)."""
    return tokens * vocab > TILE_ELEMENTS


STATS = ("entropy", "sum_p2", "kl")


@torch.no_grad()
def tiled_token_stats(
    head: Tensor | HeadInputs,
    other: Tensor | HeadInputs | None = None,
    tile: int | None = None,
    want: tuple[str, ...] = STATS,
) -> dict[str, Tensor]:
    """Per-token statistics of the next-token distribution ``p`` of a head's inputs (or of full
    (..., V) logits), fp32, no gradient, each shaped like the tokens, those in ``want`` only:
    ``entropy`` (``-sum p log p``), ``sum_p2`` (``sum p^2``, WPO's weight term) and, with ``other``
    (a second head on the same tokens: the reference), ``kl`` = KL(p || q) exactly over the
    vocabulary. One tile of logits at a time."""
    want = tuple(k for k in want if k != "kl" or other is not None)
    if unknown := set(want) - set(STATS):
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}")
    shape = head.shape[:-1]
    m = int(torch.tensor(shape).prod()) if shape else 1
    tile = tile or tile_tokens(head.shape[-1])
    device = head.hidden.device if isinstance(head, HeadInputs) else head.device
    out = {k: torch.empty(m, dtype=torch.float32, device=device) for k in want}
    for start in range(0, m, tile):
        logp = _rows(head, start, start + tile).log_softmax(-1)  # (t, V)
        p = logp.exp()
        if "entropy" in out:
            out["entropy"][start : start + tile] = -(p * logp).sum(-1)
        if "sum_p2" in out:
            out["sum_p2"][start : start + tile] = (p * p).sum(-1)
        if "kl" in out:
            logq = _rows(other, start, start + tile).log_softmax(-1)
            out["kl"][start : start + tile] = (p * (logp - logq)).sum(-1)
    return {k: v.view(shape) for k, v in out.items()}
