"""Running a causal LM over a :class:`~dpo.data.batch.ScoredBatch`, and the one choice of layout.

This is the only module that knows how a layout reaches the model (padding masks, 4D masks and
position ids, or the padding-free layout's segment attention from :mod:`dpo.models.attention`); the
maths on the resulting logits is :mod:`dpo.maths.logprobs`'.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from dpo.data.batch import Layout, ScoredBatch
from dpo.maths.logprobs import PairLogps, scored_logps
from dpo.maths.tiled import HeadInputs, is_large, tile_tokens
from dpo.models.attention import NAME as SEGMENT_ATTENTION
from dpo.models.attention import Segments, supports_segments
from dpo.runtime.log import get_logger

log = get_logger(__name__)


class LayoutError(ValueError):
    """A requested layout this model or strategy cannot run; the message says which to use."""


def choose_layout(requested: Layout, model_class: type, config: Any, *, sharded: bool, pairs: bool) -> Layout:
    """The batch layout of a run, decided once from the request, the model's class and config.

    No weights are needed (bad data still fails before any load). ``auto`` picks ``padding_free``
    (exact and fastest), ``shared_prefix`` for models whose attention bypasses transformers'
    attention interface, and ``separate`` under FSDP2 (``sharded``) or for SFT (``pairs`` False,
    rows with no rejected part). An explicit request the model or strategy cannot run raises.

    Raises:
        LayoutError: naming the layout and what to use instead.
    """
    if not pairs:
        return Layout.separate
    if sharded:
        if requested in (Layout.shared_prefix, Layout.padding_free):
            raise LayoutError(
                f"data.layout={requested.value} is untested under FSDP2; use data.layout=auto or separate"
            )
        return Layout.separate
    if requested == Layout.auto:
        if supports_segments(model_class, config):
            return Layout.padding_free
        log.info(f"data.layout=auto: {model_class.__name__} can't run padding-free; using shared_prefix")
        return Layout.shared_prefix
    if requested == Layout.padding_free and not supports_segments(model_class, config):
        raise LayoutError(
            "data.layout=padding_free needs a model whose attention goes through transformers' "
            f"AttentionInterface; {model_class.__name__} doesn't: use data.layout=shared_prefix"
        )
    return requested


def attention_for(layout: Layout) -> str | None:
    """The ``attn_implementation`` a model must be loaded with to run ``layout`` (None: its default)."""
    return SEGMENT_ATTENTION if layout == Layout.padding_free else None


def scored_logits(model: Any, batch: ScoredBatch) -> Tensor | HeadInputs:
    """Logits only at the batch's scored positions: (R, S, V); or, where ``R x S x V`` logits exceed
    one tile (:func:`dpo.maths.tiled.is_large`), the head's inputs there, from which the log-probs
    are computed tile by tile and the full logits never exist.

    Runs the model's backbone once over ``input_ids`` (with the batch's 2D padding mask, the
    shared-prefix layout's 4D mask and position ids, or the padding-free layout's ``segments``),
    gathers the hidden states at ``score_pos`` and applies the LM head there alone, so the head
    and log-softmax never touch prompt positions: the same numbers as the full forward, with less
    work (the head is a large share of a small model's FLOPs). Models whose logits are more than
    ``head(hidden)`` (soft-capping, a logit scale) take the full forward, then the gather; so do
    FSDP2-sharded models, unless tiles pay: then the full forward keeps no logits
    (``logits_to_keep``) and the tiles run on the head the root's forward gathered.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay active
    mask = batch["attention_mask"]  # (R, T) padding mask, or (R, 1, T, T) bool when packed
    if mask.dim() == 4 and inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(inner.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch.get("position_ids")}
    segments = None
    if "segments" in batch:  # padding-free: attention pair by pair (dpo.models.attention)
        segments = inputs["segments"] = Segments(batch["segments"].tolist())
    score_pos = batch["score_pos"]  # (R, S)
    head = inner.get_output_embeddings()
    fsdp = _is_fsdp(model)
    if fsdp and _plain_head(inner.config) and _tiles_pay(head, score_pos.numel()) and takes_logits_to_keep(inner):
        # FSDP2 gathers the root's parameters (the head's among them) in the root's forward and, for the
        # root, keeps them gathered until backward (torch 2.13: reshard_after_forward is False for the
        # root); so the forward runs whole but keeps no logits, and the tiles use the gathered head, whose
        # gradient FSDP2 reduce-scatters with the rest (tests/test_scale.py: FSDP2 equals one process).
        hidden = model(**inputs, output_hidden_states=True,
                       logits_to_keep=torch.zeros(0, dtype=torch.long, device=score_pos.device)).hidden_states[-1]
        pos = score_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (R, S, H)
        if type(head.weight).__name__ == "DTensor":
            raise RuntimeError("the LM head is still sharded after the root's forward (reshard_after_forward "
                               "set on the root?); set DPO_TILE_ELEMENTS high to take the full logits")  # fmt: skip
        out = HeadInputs(torch.gather(hidden, 1, pos), head.weight, head.bias)
    elif not _plain_head(inner.config) or fsdp:
        logits = model(**inputs).logits  # (R, T, V)
        out = torch.gather(logits, 1, score_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    else:
        hidden = inner.base_model(**inputs).last_hidden_state  # (R, T, H)
        pos = score_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (R, S, H)
        if _tiles_pay(head, score_pos.numel()):
            out = HeadInputs(torch.gather(hidden, 1, pos), head.weight, head.bias)
        else:
            out = head(torch.gather(hidden, 1, pos))  # (R, S, V)
    if segments is not None:
        _check_segments_used(inner.config, segments)
    return out


def logits_at(model: Any, input_ids: Tensor, attention_mask: Tensor, pos: Tensor) -> tuple[Tensor | HeadInputs, Tensor]:
    """The next-token logits (N, L, V) at positions ``pos`` (N, L) of each row, or the head's inputs
    there when those logits exceed a tile (as :func:`scored_logits`), and the last hidden states
    (N, L, H) there (PPO's value head reads them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None]
    head = inner.get_output_embeddings()
    if _plain_head(inner.config) and not _is_fsdp(model) and _tiles_pay(head, pos.numel()):
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[rows, pos]
        return HeadInputs(hidden, head.weight, head.bias), hidden
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.logits[rows, pos], out.hidden_states[-1][rows, pos]


def score_pairs(
    model: nn.Module, batch: ScoredBatch, *, pairs: bool = True, unlikelihood: bool = False,
    against: Tensor | HeadInputs | None = None, tails: bool = False, wpo: bool = False,
) -> tuple[PairLogps, Tensor | HeadInputs]:
    """Summed response log-probs of ``model`` on a batch, and the (R, S, V) logits they came from
    (or the head's inputs, :func:`scored_logits`).

    ``pairs`` False: an SFT batch (chosen rows only); ``unlikelihood``: also the rejected
    responses' token-level ``log(1 - p)``; ``against``: the policy's scored logits when ``model``
    is the reference, for the exact KL; ``tails`` and ``wpo``: LD-DPO's and WPO's per-token
    pieces (:func:`dpo.maths.logprobs.scored_logps`).
    """
    logits = scored_logits(model, batch)
    logps = scored_logps(logits, batch, pairs=pairs, unlikelihood=unlikelihood, against=against, tails=tails, wpo=wpo)
    return logps, logits


def _check_segments_used(config: Any, segments: Segments) -> None:
    """A model that didn't hand ``segments`` to each attention layer let pairs see each other: refuse."""
    layers = getattr(config, "num_hidden_layers", None)
    if segments.calls == 0 or (layers is not None and segments.calls != layers):
        raise RuntimeError(
            f"data.layout=padding_free: {segments.calls} attention layers of {layers} ran pair by pair "
            f"(attention implementation {config._attn_implementation!r}); this model needs "
            "data.layout=shared_prefix"
        )


def _tiles_pay(head: nn.Module, tokens: int) -> bool:
    """The head is a plain ``nn.Linear`` (not a PEFT-adapted one, whose adapter the tiles would skip)
    and ``tokens`` of its logits exceed a tile (:func:`dpo.maths.tiled.is_large`). Says so once."""
    pays = type(head) is nn.Linear and is_large(tokens, head.weight.shape[0])
    if pays:
        _announce_tiles(tile_tokens(head.weight.shape[0]))
    return pays


@functools.cache
def _announce_tiles(tile: int) -> None:
    log.info(f"log-probs through the LM head in tiles of {tile} tokens (the batch's logits exceed one tile; "
             "dpo.maths.tiled)")  # fmt: skip


def takes_logits_to_keep(model: Any) -> bool:
    """The model's forward takes ``logits_to_keep`` (transformers' causal LMs since 4.50): the decode
    loop asks for the last position's logits only, the tiles under FSDP2 for none."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _is_fsdp(model: Any) -> bool:
    """FSDP2 gathers the root's parameters in the root's forward: the backbone can't run alone."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _plain_head(config: Any) -> bool:
    """Whether the model's logits are exactly its output embedding applied to the last hidden state."""
    scale = getattr(config, "logit_scale", None)
    return not getattr(config, "final_logit_softcapping", None) and scale in (None, 1, 1.0)
