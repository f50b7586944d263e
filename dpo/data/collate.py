"""Batching tokenized pairs: concatenation, label masking and dynamic padding."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import torch
from torch import Tensor

from dpo.data.tokenize import TokenizedPair
from dpo.logprobs import IGNORE_INDEX


class PreferenceBatch(TypedDict):
    """A padded batch of ``B`` pairs as ``2B`` rows, or ``B`` rows for SFT.

    Row order is ``[chosen_0, ..., chosen_{B-1}, rejected_0, ..., rejected_{B-1}]``: the model
    runs once on all rows and :meth:`dpo.module.DPOModule.split` cuts at ``B``.

    Attributes:
        input_ids: (2B, T) prompt + response tokens, right-padded with the pad id.
        attention_mask: (2B, T) 1 on real tokens.
        labels: (2B, T) the input ids on response tokens, ``IGNORE_INDEX`` on prompt and padding.
        ref_logps: (2B,) precomputed reference log-probs in the same row order, when present.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    ref_logps: NotRequired[Tensor]


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
    for i, (ids, n_prompt) in enumerate(rows):
        seq = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = seq
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = seq[n_prompt:]
    batch = PreferenceBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if pairs and examples[0].ref_logps is not None:
        batch["ref_logps"] = stack_ref_logps(examples)
    return batch


def stack_ref_logps(examples: list[TokenizedPair]) -> Tensor:
    """Precomputed reference log-probs of a batch as (2B,) ``[chosen; rejected]``, the row order of
    the separate layout (the packed layout uses the same order)."""
    chosen, rejected = zip(*(ex.ref_logps for ex in examples), strict=True)
    return torch.tensor(chosen + rejected, dtype=torch.float32)
