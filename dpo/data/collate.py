"""Batching tokenized pairs: concatenation, label masking and dynamic padding."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import torch
from torch import Tensor

from dpo.data.tokenize import TokenizedPair
from dpo.logprobs import IGNORE_INDEX


class ScoredBatch(TypedDict):
    """What every batch layout gives the model and the log-prob code (:func:`dpo.logprobs.scored_logits`,
    :func:`dpo.logprobs.scored_logps`): ``R`` rows of ``T`` tokens, ``S`` scored tokens per row.

    Attributes:
        input_ids: (R, T) token ids, right-padded with the pad id.
        attention_mask: (R, T) 1 on real tokens, or a layout's (R, 1, T, T) bool mask.
        score_pos: (R, S) position whose hidden state predicts each scored (response) token, so
            the LM head runs only there.
        score_tgt: (R, S) the scored token ids.
        score_seg: (R, S) 0 on chosen tokens, 1 on rejected tokens, -1 padding.
        score_pair: (R, S) index in the batch (0..B-1) of the pair each scored token belongs to.
        n_pairs: ``B``.
        ref_logps: (2B,) precomputed reference log-probs ``[chosen; rejected]``, when present.
    """

    input_ids: Tensor
    attention_mask: Tensor
    score_pos: Tensor
    score_tgt: Tensor
    score_seg: Tensor
    score_pair: Tensor
    n_pairs: int
    ref_logps: NotRequired[Tensor]


class PreferenceBatch(ScoredBatch):
    """A padded batch of ``B`` pairs as ``2B`` rows, or ``B`` rows for SFT.

    Row order is ``[chosen_0, ..., chosen_{B-1}, rejected_0, ..., rejected_{B-1}]``: the model
    runs once on all rows; row ``i`` holds pair ``i mod B`` (``score_pair``), and its scored
    tokens are all chosen (``score_seg`` 0) for ``i < B``, all rejected (1) after.

    Attributes:
        labels: (2B, T) the input ids on response tokens, ``IGNORE_INDEX`` on prompt and padding.
    """

    labels: Tensor


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (padding is masked everywhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(
    examples: list[TokenizedPair], pad_id: int, *, pairs: bool = True, pad_to_multiple_of: int = 1
) -> PreferenceBatch:
    """Concatenate prompt and response, mask the prompt in ``labels``, pad to the longest row.

    Args:
        examples: tokenized rows.
        pad_id: token id used for padding (masked out of attention and labels).
        pairs: emit chosen and rejected rows (DPO); False emits only chosen rows (SFT).
        pad_to_multiple_of: round the padded length up to a multiple of this (1: no rounding).
    """
    rows: list[tuple[list[int], int]] = [(ex.prompt_ids + ex.chosen_ids, len(ex.prompt_ids)) for ex in examples]
    if pairs:
        for ex in examples:
            if ex.rejected_ids is None:
                raise ValueError("a preference batch needs rejected responses; got an SFT row")
            rows.append((ex.prompt_ids + ex.rejected_ids, len(ex.prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Token t is predicted by position t - 1; the first token of a row is never scored.
    starts = [max(n_prompt, 1) for _, n_prompt in rows]
    scored = max(1, max(len(ids) - start for (ids, _), start in zip(rows, starts, strict=True)))
    score_pos = torch.zeros((len(rows), scored), dtype=torch.long)
    score_tgt = torch.full((len(rows), scored), pad_id, dtype=torch.long)
    score_seg = torch.full((len(rows), scored), -1, dtype=torch.long)
    score_pair = (torch.arange(len(rows)) % len(examples)).unsqueeze(1).expand(-1, scored).contiguous()
    for i, ((ids, n_prompt), start) in enumerate(zip(rows, starts, strict=True)):
        seq = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = seq
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = seq[n_prompt:]
        n = len(ids) - start
        score_pos[i, :n] = torch.arange(start - 1, len(ids) - 1)
        score_tgt[i, :n] = seq[start:]
        score_seg[i, :n] = 0 if i < len(examples) else 1  # rows [:B] chosen, [B:] rejected
    batch = PreferenceBatch(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels,
        score_pos=score_pos, score_tgt=score_tgt, score_seg=score_seg, score_pair=score_pair,
        n_pairs=len(examples),
    )  # fmt: skip
    if pairs and examples[0].ref_logps is not None:
        batch["ref_logps"] = stack_ref_logps(examples)
    return batch


def stack_ref_logps(examples: list[TokenizedPair]) -> Tensor:
    """Precomputed reference log-probs of a batch as (2B,) ``[chosen; rejected]``, the row order of
    the separate layout (the pair layouts use the same order)."""
    chosen, rejected = zip(*(ex.ref_logps for ex in examples), strict=True)
    return torch.tensor(chosen + rejected, dtype=torch.float32)
