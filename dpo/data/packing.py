"""Prompt-prefix sharing: each pair as one sequence ``prompt | chosen | rejected``.

The prompt is processed once instead of twice. Two layouts are built here:

* ``shared_prefix``: one row per pair, right-padded to the longest, with a 4D attention mask;
  works with any model that takes a 4D mask.
* ``padding_free``: every pair of the micro-batch back to back in a single row, no padding at
  all; attention runs pair by pair (:mod:`dpo.models.attention`), so no (T, T) mask is built.

Exactness rests on three things, all built here:

* attention lets every token see the tokens before it in its own pair, except that rejected
  tokens never see chosen tokens (the 4D mask, or the ``segments`` that :mod:`dpo.models.attention`
  reads);
* rejected position ids restart where the chosen ones did (right after the prompt);
* each response token is scored from the hidden state of the token that precedes it *in its own
  sequence*: the first rejected token is predicted from the last prompt token, not from the last
  chosen token. ``score_pos`` holds those predictor positions, so the LM head and log-softmax run
  only there (never on prompt positions).

Shapes: ``B`` pairs, ``R`` rows (``B``, or 1 when padding-free), ``T`` tokens per row, ``S``
scored tokens per row (chosen + rejected, padded).
"""

from __future__ import annotations

import torch

from dpo.data.batch import CHOSEN, PAD, REJECTED, PackedBatch
from dpo.data.collate import rows_of, stack_ref_logps, with_labels
from dpo.data.tokenize import TokenizedPair


def pack_pairs(examples: list[TokenizedPair], pad_id: int, padding_free: bool = False) -> PackedBatch:
    """Pack pairs one per row (padded, 4D mask) or all into one row (``padding_free``), with positions
    and scoring indices.

    Pairs never see each other and positions restart at each pair, so every pair's log-probs
    equal those of its own two rows.
    """
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples]
    rows = [list(range(len(examples)))] if padding_free else [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    scored = max(sum(len(examples[i].chosen_ids) + len(examples[i].rejected_ids) for i in row) for row in rows)
    r_ = len(rows)
    input_ids = torch.full((r_, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((r_, width), dtype=torch.long)
    mask = None if padding_free else torch.zeros((r_, 1, width, width), dtype=torch.bool)
    score_pos = torch.zeros((r_, scored), dtype=torch.long)
    score_tgt = torch.full((r_, scored), pad_id, dtype=torch.long)
    score_seg = torch.full((r_, scored), PAD, dtype=torch.long)
    score_pair = torch.zeros((r_, scored), dtype=torch.long)
    segments = []
    for k, row in enumerate(rows):
        o = s = 0  # token offset and scored offset of the next pair in this row
        for i in row:
            e = examples[i]
            p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
            n = p + c + r
            input_ids[k, o : o + n] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
            position_ids[k, o : o + p + c] = torch.arange(p + c)
            position_ids[k, o + p + c : o + n] = torch.arange(p, p + r)
            if mask is not None:
                causal = torch.ones((n, n), dtype=torch.bool).tril()  # (n, n)
                causal[p + c : n, p : p + c] = False  # rejected never sees chosen
                mask[k, 0, o : o + n, o : o + n] = causal
            segments.append((p, c, r))
            # Chosen token t (packed index p + t) is predicted at p + t - 1; rejected token t at
            # p + c + t - 1, except its first token, predicted by the last prompt token p - 1.
            chosen_pos = torch.arange(p - 1, p + c - 1)
            rejected_pos = torch.cat([torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)])
            score_pos[k, s : s + c + r] = o + torch.cat([chosen_pos, rejected_pos])
            score_tgt[k, s : s + c + r] = torch.tensor(e.chosen_ids + e.rejected_ids)
            score_seg[k, s : s + c] = CHOSEN
            score_seg[k, s + c : s + c + r] = REJECTED
            score_pair[k, s : s + c + r] = i
            o, s = o + n, s + c + r
        if mask is not None:
            mask[k, 0, o:, o:] = torch.eye(width - o, dtype=torch.bool)  # padding attends only itself
    batch = PackedBatch(
        input_ids=input_ids, position_ids=position_ids,
        attention_mask=torch.ones((1, width), dtype=torch.long) if mask is None else mask,
        score_pos=score_pos, score_tgt=score_tgt, score_seg=score_seg, score_pair=score_pair,
        n_pairs=len(examples), rows=rows_of(examples), n_tokens=sum(2 * p + c + r for p, c, r in segments),
    )  # fmt: skip
    if padding_free:
        batch["segments"] = torch.tensor(segments, dtype=torch.long)  # (B, 3)
    if examples[0].ref_logps is not None:
        batch["ref_logps"] = stack_ref_logps(examples)
    return with_labels(batch, examples)
