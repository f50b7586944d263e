"""Segment attention: the attention of the padding-free layout (:mod:`dpo.data.packing`).

A padding-free batch is one row holding every pair of the micro-batch back to back,
``prompt | chosen | rejected | prompt | chosen | rejected | ...``, with no padding token at all.
Attention must not cross pairs, and inside a pair the rejected tokens see the prompt but never
the chosen tokens. A (T, T) mask would make attention quadratic in the whole micro-batch, so
instead attention runs pair by pair, as two SDPA calls: causal over ``prompt | chosen``, then the
rejected queries over ``[prompt; rejected]`` keys with a bottom-right-aligned causal mask. The
numbers are those of the pair's own two rows; the linear layers see no padding.

It is registered with transformers' ``AttentionInterface`` under :data:`NAME` (the library's
extension point, no patching) and behaves exactly like ``sdpa`` whenever the forward carries no
``segments`` keyword, so generation and padded layouts run through it unchanged. Models built on
that interface (``_supports_attention_backend``: GPT-2, Llama, Qwen2, Mistral, SmolLM2, ...) hand
the keyword down to every attention layer; :func:`dpo.models.forward.scored_logits` checks that each
layer really ran segment-wise, so a model that drops the keyword fails loudly, never silently.
A model runs it when loaded with ``attn_implementation=NAME`` (:func:`dpo.models.forward.attention_for`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "dpo_segments"


class Segments:
    """The pairs of a padding-free row, and a count of the attention layers that used them.

    Args:
        spans: per pair ``(prompt, chosen, rejected)`` token counts, in row order; the pairs fill
            the row from its first token to its last.
    """

    def __init__(self, spans: list[list[int]]) -> None:
        self.spans = spans
        self.calls = 0


def segment_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: Segments | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention of one layer; ``query``/``key``/``value`` are (1, H, T, D) (keys may have fewer heads).

    Returns:
        ``(out, None)`` with ``out`` (1, T, H, D), as transformers' attention functions do.
    """
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one padding-free row, got {query.shape[0]}")
    # The row has no padding, so whatever mask the model built from it is causal, or causal within
    # a sliding window, which the length check below covers: the pair structure replaces it.
    if kwargs.get("softcap") is not None:
        raise ValueError("segment attention has no logit soft-capping; use data.layout=shared_prefix for this model")
    window = kwargs.get("sliding_window")
    if window is not None and max(p + max(c, r) for p, c, r in segments.spans) >= window:
        raise ValueError(f"a pair is longer than the sliding window ({window}); use data.layout=shared_prefix")
    segments.calls += 1
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: repeat the key/value heads
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    # One split per tensor into the pairs' ``prompt | chosen`` and ``rejected`` pieces, not a slice
    # per piece: each slice's backward would write its gradient into a zeroed copy of the whole row.
    sizes = [n for p, c, r in segments.spans for n in (p + c, r)]
    if sum(sizes) != query.shape[2]:
        raise ValueError(f"segments cover {sum(sizes)} tokens of a {query.shape[2]}-token row")
    qs, ks, vs = (x.split(sizes, dim=2) for x in (query, key, value))  # each 2B pieces (1, H, n, D)
    outs = []
    for j, (p, _, r) in enumerate(segments.spans):
        # prompt | chosen: plain causal attention within the pair.
        q, k, v = qs[2 * j], ks[2 * j], vs[2 * j]
        outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling))
        if r:
            # rejected queries over [prompt; rejected] keys; rejected token i sees the prompt and rejected 0..i.
            keys = torch.cat([k[:, :, :p], ks[2 * j + 1]], dim=2)  # (1, H, p + r, D)
            values = torch.cat([v[:, :, :p], vs[2 * j + 1]], dim=2)
            mask = torch.ones(r, p + r, dtype=torch.bool, device=query.device).tril(diagonal=p)  # (r, p + r)
            out = F.scaled_dot_product_attention(
                qs[2 * j + 1], keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
            outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


AttentionInterface.register(NAME, segment_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches get sdpa's masks


def supports_segments(model_class: type, config: Any) -> bool:
    """Whether models of ``model_class`` with ``config`` can run segment attention: their attention
    goes through transformers' ``AttentionInterface`` and is plain scaled dot-product attention."""
    # Soft-capped scores (Gemma-2) are not SDPA's; chunked attention (Llama-4) is not a causal mask.
    unusual = getattr(config, "attn_logit_softcapping", None) or getattr(config, "attention_chunk_size", None)
    return bool(getattr(model_class, "_supports_attention_backend", False)) and not unusual
