"""The ``separate`` layout: chosen and rejected rows, label masking and dynamic padding."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo.data.batch import CHOSEN, IGNORE_INDEX, PAD, REJECTED, PreferenceBatch, ScoredBatch
from dpo.data.tokenize import TokenizedPair


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
    score_seg = torch.full((len(rows), scored), PAD, dtype=torch.long)
    score_pair = (torch.arange(len(rows)) % len(examples)).unsqueeze(1).expand(-1, scored).contiguous()
    for i, ((ids, n_prompt), start) in enumerate(zip(rows, starts, strict=True)):
        seq = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = seq
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = seq[n_prompt:]
        n = len(ids) - start
        score_pos[i, :n] = torch.arange(start - 1, len(ids) - 1)
        score_tgt[i, :n] = seq[start:]
        score_seg[i, :n] = CHOSEN if i < len(examples) else REJECTED  # rows [:B] chosen, [B:] rejected
    batch = PreferenceBatch(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels,
        score_pos=score_pos, score_tgt=score_tgt, score_seg=score_seg, score_pair=score_pair,
        n_pairs=len(examples), rows=rows_of(examples), n_tokens=sum(len(ids) for ids, _ in rows),
    )  # fmt: skip
    if pairs and examples[0].ref_logps is not None:
        batch["ref_logps"] = stack_ref_logps(examples)
    return with_labels(batch, examples)


def with_labels(batch: ScoredBatch, examples: list[TokenizedPair]) -> ScoredBatch:
    """KTO's rows carry their labels as ``kto_label`` (B,) bool (:mod:`dpo.data.unpaired`)."""
    if examples[0].label is not None:
        batch["kto_label"] = torch.tensor([bool(ex.label) for ex in examples])
    return batch


def rows_of(examples: list[TokenizedPair]) -> Tensor:
    """The (B,) split rows of a batch's pairs."""
    return torch.tensor([ex.index for ex in examples], dtype=torch.long)


def stack_ref_logps(examples: list[TokenizedPair]) -> Tensor:
    """Precomputed reference log-probs of a batch as (2B,) ``[chosen; rejected]``, the row order of
    the separate layout (the pair layouts use the same order)."""
    chosen, rejected = zip(*(ex.ref_logps for ex in examples), strict=True)
    return torch.tensor(chosen + rejected, dtype=torch.float32)


def collate_prompts(items: list[TokenizedPair]) -> dict[str, Any]:
    """A batch of prompts only (systems that sample their own responses, e.g. PPO):
    ``prompt_ids`` (B lists of ids), ``rows`` (B,) and ``n_pairs`` B."""
    return {
        "prompt_ids": [list(item.prompt_ids) for item in items],
        "rows": torch.tensor([item.index for item in items], dtype=torch.long),
        "n_pairs": len(items),
    }
