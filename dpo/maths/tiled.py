"""Per-token log-probs through the LM head in tiles, without the (tokens, V) logits in memory.

A modern vocabulary (128k-152k entries) makes the logits the largest tensor of a step: ``M``
scored tokens hold ``M x V`` logits in the compute dtype, their fp32 upcast and the fp32
log-softmax that backward keeps. :func:`tiled_logps` computes ``log p(target)`` of each token
tile by tile (``tile_tokens(V)`` tokens at a time): each tile's logits are made from the hidden
states and the head's weight, reduced to one log-sum-exp and one target logit per token, and
dropped. Backward recomputes each tile's logits and softmax from the saved hidden states, weight
and log-sum-exps (the gradient of ``log p(y)`` with respect to the logits is ``onehot(y) - p``), so
the peak holds one tile's logits instead of all of them. Every tile of a loop is written into
one buffer allocated once (:class:`_Scratch`), and the softmax work is done in place there. The
same idea as TRL 1.16's fused LM head (``trl/trainer/utils.py``) and Liger's fused linear
cross-entropy.

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


def wide(x: Tensor) -> Tensor:
    """``x`` in fp32, or as it is when wider (fp64 models, in tests that compare maths exactly)."""
    return x if x.dtype == torch.float64 else x.float()


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


class _Scratch:
    """One (tile, V) fp32 buffer (and one in the compute dtype when that is not fp32) that every
    tile of a loop writes its logits into: a loop allocates them once instead of once per tile (on
    a CPU a fresh tile-sized tensor is page-faulted in on first touch, which cost more than the
    tile's matmul)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, count: int = 1,
                 accumulate: torch.dtype = torch.float32):  # fmt: skip
        self.fp32 = [torch.empty(rows, vocab, dtype=accumulate, device=device) for _ in range(count)]
        self.low = None if dtype == torch.float32 else torch.empty(rows, vocab, dtype=dtype, device=device)
        self.dtype = dtype

    def logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, slot: int = 0) -> Tensor:
        """fp32 (m, V) logits of ``hidden`` (m, H) in buffer ``slot``: the head's matmul in the compute dtype."""
        m, out = hidden.shape[0], self.fp32[slot][: hidden.shape[0]]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(self.dtype), weight.to(self.dtype)
            target = out if self.low is None else self.low[:m]
            if bias is None:
                torch.mm(h, w.T, out=target)
            else:  # as F.linear: the bias added inside the product, rounded once
                torch.addmm(bias.to(self.dtype), h, w.T, out=target)
            if self.low is not None:
                out.copy_(target)
        return out


def _lse_in_place(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """log-sum-exp of each row of fp32 ``logits`` (t, V), max-shifted as ``torch.logsumexp``;
    ``exp(logits - max)`` is written into ``out`` (same shape), or over ``logits`` without it."""
    top = logits.amax(-1, keepdim=True)  # (t, 1)
    top.masked_fill_(~torch.isfinite(top), 0.0)  # rows of -inf (or inf) as torch.logsumexp treats them
    total = torch.sub(logits, top, out=logits if out is None else out).exp_().sum(-1)
    return total.log_().add_(top[:, 0])


class _TiledLogps(torch.autograd.Function):
    """log p(target) per token from hidden states and the head, tile by tile, forward and backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tile: int) -> Tensor:
        m = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        scratch = _Scratch(min(tile, m), weight.shape[0], dtype, hidden.device)
        for start in range(0, m, tile):
            logits = scratch.logits(hidden[start : start + tile], weight, bias)  # (t, V) fp32
            chosen = logits.gather(1, targets[start : start + tile, None]).squeeze(1)
            lse[start : start + tile] = _lse_in_place(logits)
            logps[start : start + tile] = chosen - lse[start : start + tile]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.tile, ctx.dtype = tile, dtype
        return logps

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        scratch = _Scratch(min(ctx.tile, hidden.shape[0]), weight.shape[0], dtype, hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], ctx.tile):
                stop = start + ctx.tile
                h = hidden[start:stop].to(dtype)
                g = scratch.logits(h, w, bias)  # (t, V) the logits again
                # d log p(y) / d logits = onehot(y) - softmax, times the incoming gradient u of each token;
                # in place over the tile: -u * exp(logits - lse), then +u at the target
                u = grad[start:stop, None]
                g.sub_(lse[start:stop, None]).exp_().mul_(-u)
                g.scatter_add_(1, targets[start:stop, None], u.to(g.dtype))
                if scratch.low is None:
                    gc = g
                else:
                    gc = scratch.low[: g.shape[0]]
                    gc.copy_(g)
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
def logps_and_kl(head: Tensor | HeadInputs, targets: Tensor, against: Tensor | HeadInputs, where: Tensor | None = None,
                 tile: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """log p(target) under ``head`` (the reference, q) and the exact KL(p || q) of ``against`` (the
    policy, p) on the same tokens, fp32, no gradient, each shaped like ``targets``: one loop, each
    tile's reference logits made once for both. ``KL = sum_v p_v (a_v - b_v) - lse(a) + lse(b)``
    with ``a``, ``b`` the logits of p and q. ``where`` (bool, shaped like ``targets``): measure the
    KL only there (0 elsewhere), so the policy's logits are made only for those tokens."""
    flat = targets.reshape(-1)
    m, vocab = flat.shape[0], head.shape[-1]
    tile = tile or tile_tokens(vocab)
    wanted = None if where is None else where.reshape(-1)
    source = head if isinstance(head, HeadInputs) else against if isinstance(against, HeadInputs) else None
    dtype = _compute_dtype(source.hidden) if source is not None else torch.float32
    accumulate = torch.float64 if torch.float64 in (_dtype(head), _dtype(against)) else torch.float32
    logps = torch.empty(m, dtype=accumulate, device=flat.device)
    kl = torch.zeros_like(logps)
    # three buffers: reference, policy, work
    scratch = _Scratch(min(tile, m), vocab, dtype, flat.device, count=3, accumulate=accumulate)
    for start in range(0, m, tile):
        stop = min(start + tile, m)
        b = _rows(head, start, stop, scratch if isinstance(head, HeadInputs) else None)  # (t, V) reference logits
        work = scratch.fp32[2][: stop - start]
        lse_b = _lse_in_place(b, out=work)  # b stays: the KL needs it
        if isinstance(head, HeadInputs):  # as tiled_logps computes the policy's
            logps[start:stop] = b.gather(1, flat[start:stop, None]).squeeze(1) - lse_b
        else:  # as target_logps computes the policy's from logits: equal log-probs give a loss of exactly ln 2
            logps[start:stop] = -F.cross_entropy(b, flat[start:stop], reduction="none")
        rows = None if wanted is None else wanted[start:stop].nonzero()[:, 0]
        if rows is not None and rows.numel() == 0:
            continue
        a = _rows(against, start, stop, scratch, 1, rows)  # (k, V) policy logits of the wanted tokens
        diff = work[: a.shape[0]]
        if rows is None:
            torch.sub(b, a, out=diff)
        else:
            torch.index_select(b, 0, rows, out=diff).sub_(a)  # b - a
            lse_b = lse_b[rows]
        lse_a = _lse_in_place(a)  # a now holds exp(a - max), its sum exp(lse_a - max)
        total = a.sum(-1)
        # sum_v p_v (a_v - b_v) = -(exp(a - max) . (b - a)) / sum exp(a - max), a batched dot (no (k, V) product)
        mean_diff = torch.bmm(a[:, None, :], diff[:, :, None])[:, 0, 0] / total
        values = -mean_diff - lse_a + lse_b
        if rows is None:
            kl[start:stop] = values
        else:
            kl[start:stop].index_copy_(0, rows, values)
    return logps.view(targets.shape), kl.view(targets.shape)


def _rows(x: Tensor | HeadInputs, start: int, stop: int, scratch: _Scratch | None = None, slot: int = 0,
          rows: Tensor | None = None) -> Tensor:  # fmt: skip
    """fp32 logits of flattened tokens ``start:stop`` (of those ``rows`` among them) of full logits
    or of a head's inputs; into ``scratch``'s buffer ``slot`` when given (a copy: the caller may
    overwrite it), else full logits' own rows where they are fp32 already."""
    if isinstance(x, HeadInputs):
        hidden = x.hidden.reshape(-1, x.hidden.shape[-1])[start:stop]
        hidden = hidden if rows is None else hidden[rows]
        if scratch is None:
            return _tile_logits(hidden, x.weight, x.bias)
        return scratch.logits(hidden, x.weight, x.bias, slot)
    flat = x.reshape(-1, x.shape[-1])[start:stop]
    flat = flat if rows is None else flat[rows]
    if scratch is None:
        return wide(flat)
    out = scratch.fp32[slot][: flat.shape[0]]
    return out.copy_(flat)


def _dtype(x: Tensor | HeadInputs) -> torch.dtype:
    return x.hidden.dtype if isinstance(x, HeadInputs) else x.dtype


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
    out = {k: torch.empty(m, dtype=torch.float64 if _dtype(head) == torch.float64 else torch.float32, device=device)
           for k in want}  # fmt: skip
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
