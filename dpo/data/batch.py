"""The batch contract between the data pipeline and the model-running code.

Every layout (:class:`Layout`) produces a :class:`ScoredBatch`: the rows the model runs on, and
for each response token where its predictor sits (``score_pos``), which token it is
(``score_tgt``), whether it belongs to a chosen or a rejected response (``score_seg``, the
:data:`CHOSEN` / :data:`REJECTED` / :data:`PAD` codes) and to which pair (``score_pair``).
:mod:`dpo.models.forward` runs a model on it and :mod:`dpo.maths.logprobs` sums the log-probs per pair; neither
needs to know the layout.

Shapes: ``B`` pairs, ``R`` rows, ``T`` tokens per row, ``S`` scored tokens per row.
"""

from __future__ import annotations

from enum import Enum
from typing import NotRequired, TypedDict

from torch import Tensor

IGNORE_INDEX = -100
"""Label value of positions that are not scored (prompt and padding), as in Hugging Face."""

CHOSEN, REJECTED, PAD = 0, 1, -1
"""``score_seg`` codes: a chosen response token, a rejected one, padding."""


class Layout(str, Enum):
    """How the pairs of a micro-batch are laid out for the forward pass (``data.layout``).

    All are exact: the log-probs agree to fp32 rounding (tests/test_packing.py).

    * ``separate``: chosen and rejected as two right-padded rows per pair (TRL's layout); rows
      ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``.
    * ``shared_prefix``: one padded row per pair, ``prompt | chosen | rejected``, with a 4D mask in
      which rejected tokens never see chosen ones; the prompt runs once.
    * ``padding_free``: every pair of the micro-batch back to back in one row with no padding;
      attention runs pair by pair (:mod:`dpo.models.attention`).
    * ``auto``: the config's request to pick (:func:`dpo.models.forward.choose_layout`); never a batch's.
    """

    auto = "auto"
    separate = "separate"
    shared_prefix = "shared_prefix"
    padding_free = "padding_free"


class ScoredBatch(TypedDict):
    """What every layout gives the model and the log-prob code.

    Attributes:
        input_ids: (R, T) token ids, right-padded with the pad id.
        attention_mask: (R, T) 1 on real tokens, or a layout's (R, 1, T, T) bool mask.
        score_pos: (R, S) position whose hidden state predicts each scored (response) token, so
            the LM head runs only there.
        score_tgt: (R, S) the scored token ids.
        score_seg: (R, S) :data:`CHOSEN`, :data:`REJECTED` or :data:`PAD`.
        score_pair: (R, S) index in the batch (0..B-1) of the pair each scored token belongs to.
        n_pairs: ``B``.
        n_tokens: the pairs' tokens as two unpadded rows each (prompt + chosen, prompt + rejected;
            prompt + chosen alone for SFT), whatever the layout: the work a step does in TRL's
            terms, so ``train/tokens_per_s`` compares across layouts and with other trainers.
        rows: (B,) each pair's row in its split (-1: a stand-in that counts for nothing), for
            messages that name rows (the non-finite guard) and for gathering per-row results.
        ref_logps: (2B,) precomputed reference log-probs ``[chosen; rejected]``, when present.
        kto_label: (B,) bool, KTO's rows only: each completion desirable or not; their ``chosen``
            segment is the completion, ``rejected`` the mismatched one (:mod:`dpo.data.unpaired`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    score_pos: Tensor
    score_tgt: Tensor
    score_seg: Tensor
    score_pair: Tensor
    n_pairs: int
    n_tokens: int
    rows: Tensor
    ref_logps: NotRequired[Tensor]
    kto_label: NotRequired[Tensor]


class PreferenceBatch(ScoredBatch):
    """The ``separate`` layout: ``B`` pairs as ``2B`` padded rows, or ``B`` rows for SFT.

    Row order is ``[chosen_0, ..., chosen_{B-1}, rejected_0, ..., rejected_{B-1}]``: row ``i``
    holds pair ``i mod B``, its scored tokens all chosen for ``i < B`` and all rejected after.

    Attributes:
        labels: (2B, T) the input ids on response tokens, :data:`IGNORE_INDEX` on prompt and padding.
    """

    labels: Tensor


class PackedBatch(ScoredBatch):
    """The ``shared_prefix`` and ``padding_free`` layouts: ``B`` pairs in ``R`` rows.

    Attributes:
        position_ids: (R, T) positions; they restart at 0 for each pair, and its rejected segment
            restarts after its prompt.
        attention_mask: (R, 1, T, T) bool, True where a query token may attend a key token; or,
            padding-free, (1, T) ones, attention being given by ``segments``.
        segments: padding-free only: (B, 3) ``prompt, chosen, rejected`` token counts of each
            pair, in row order (:class:`dpo.models.attention.Segments`).
    """

    position_ids: Tensor
    segments: NotRequired[Tensor]
