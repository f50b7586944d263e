"""Prompt-prefix sharing: one packed row per pair, ``prompt | chosen | rejected``.

The prompt is processed once instead of twice. Exactness rests on three things, all built here:

* the 4D attention mask lets every token see the tokens before it, except that rejected tokens
  never see chosen tokens (and padding sees nothing real);
* rejected position ids restart where the chosen ones did (right after the prompt);
* each response token is scored from the hidden state of the token that precedes it *in its own
  sequence*: the first rejected token is predicted from the last prompt token, not from the last
  chosen token. ``score_pos`` holds those predictor positions, so the LM head and log-softmax run
  only there (never on prompt positions).

Shapes: ``B`` pairs, ``T`` packed tokens, ``S`` scored tokens per row (chosen + rejected, padded).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch
from torch import Tensor

from dpo.data.collate import stack_ref_logps
from dpo.data.tokenize import TokenizedPair

CHOSEN, REJECTED, NONE = 0, 1, -1


class PackedBatch(TypedDict):
    """A batch of ``B`` pairs packed one row each.

    Attributes:
        input_ids: (B, T) ``prompt | chosen | rejected``, right-padded.
        position_ids: (B, T) positions; the rejected segment restarts after the prompt.
        attention_mask: (B, 1, T, T) bool, True where a query token may attend a key token.
        score_pos: (B, S) position whose hidden state predicts each scored token.
        score_tgt: (B, S) the scored token ids.
        score_seg: (B, S) ``CHOSEN`` (0), ``REJECTED`` (1) or ``NONE`` (-1, padding).
        ref_logps: (2B,) precomputed reference log-probs ``[chosen; rejected]``, when present.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    score_pos: Tensor
    score_tgt: Tensor
    score_seg: Tensor
    ref_logps: NotRequired[Tensor]


def pack_pairs(examples: list[TokenizedPair], pad_id: int) -> PackedBatch:
    """Pack each pair into one row with its mask, positions and scoring indices."""
    b = len(examples)
    width = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    scored = max(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    score_pos = torch.zeros((b, scored), dtype=torch.long)
    score_tgt = torch.full((b, scored), pad_id, dtype=torch.long)
    score_seg = torch.full((b, scored), NONE, dtype=torch.long)
    for i, e in enumerate(examples):
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        n = p + c + r
        input_ids[i, :n] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : n] = torch.arange(p, p + r)
        causal = torch.ones((n, n), dtype=torch.bool).tril()  # (n, n)
        causal[p + c : n, p : p + c] = False  # rejected never sees chosen
        mask[i, 0, :n, :n] = causal
        mask[i, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding attends only itself
        # Chosen token t (packed index p + t) is predicted at p + t - 1; rejected token t at
        # p + c + t - 1, except its first token, predicted by the last prompt token p - 1.
        chosen_pos = torch.arange(p - 1, p + c - 1)
        rejected_pos = torch.cat([torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)])
        score_pos[i, : c + r] = torch.cat([chosen_pos, rejected_pos])
        score_tgt[i, : c + r] = torch.tensor(e.chosen_ids + e.rejected_ids)
        score_seg[i, :c] = CHOSEN
        score_seg[i, c : c + r] = REJECTED
    batch = PackedBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
        score_pos=score_pos, score_tgt=score_tgt, score_seg=score_seg,
    )  # fmt: skip
    if examples[0].ref_logps is not None:
        batch["ref_logps"] = stack_ref_logps(examples)
    return batch
