"""Per-sequence log-probabilities of response tokens: pure functions of logits and token ids.

Shapes: ``N`` rows (``2B`` when chosen and rejected are stacked), ``T`` tokens, ``V`` vocabulary;
``B`` pairs, ``R`` rows and ``S`` scored tokens per row for the batches of :mod:`dpo.data.batch`.
Running a model to get the logits is :mod:`dpo.models.forward`'s job.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.data.batch import CHOSEN, IGNORE_INDEX, REJECTED, ScoredBatch
from dpo.maths.tiled import HeadInputs, logps_and_kl, tiled_logps, tiled_token_stats, wide


class SequenceLogps(NamedTuple):
    """Log-probabilities of the masked (response) tokens of each row of full sequences.

    Attributes:
        sum: (N,) sum over response tokens of log p(token | prefix).
        mean: (N,) ``sum / n_tokens``; 0 for a row with no response token.
        n_tokens: (N,) number of response tokens scored, as float.
    """

    sum: Tensor
    mean: Tensor
    n_tokens: Tensor


class PairLogps(NamedTuple):
    """Summed response log-probs of a batch of pairs, with response lengths.

    Attributes:
        chosen: (B,) sum of log-probs of the chosen response tokens.
        rejected: (B,) the same for the rejected responses (empty (0,) for SFT batches).
        chosen_tokens: (B,) number of chosen response tokens, float.
        rejected_tokens: (B,) number of rejected response tokens, float.
        rejected_unlikely: (B,) sum over rejected tokens of log(1 - p(token | prefix)), the
            unlikelihood term (Welleck et al. 2019); None unless the loss asked for it.
        chosen_kl: (B,) exact KL(policy || these log-probs' model) summed over the chosen tokens
            (the reference's, scored ``against`` the policy: :func:`scored_logps`); else None.
        chosen_tail: (B,) the part of ``chosen`` from tokens past the pair's shared length
            ``min(|c|, |r|)`` (LD-DPO); None unless scored with ``tails``.
        rejected_tail: (B,) the same for the rejected responses.
        wpo_log_weight: (B,) WPO's log pair weight, ``mean_t [log p_t - log sum_v p_v^2]`` over the
            chosen tokens plus the same over the rejected ones, no gradient; None unless scored with ``wpo``.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    rejected_unlikely: Tensor | None = None
    chosen_kl: Tensor | None = None
    chosen_tail: Tensor | None = None
    rejected_tail: Tensor | None = None
    wpo_log_weight: Tensor | None = None

    @property
    def chosen_mean(self) -> Tensor:
        """(B,) per-token mean log-prob of the chosen responses."""
        return self.chosen / self.chosen_tokens.clamp(min=1.0)

    @property
    def rejected_mean(self) -> Tensor:
        """(B,) per-token mean log-prob of the rejected responses."""
        return self.rejected / self.rejected_tokens.clamp(min=1.0)


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each scored next token, computed in fp32.

    Logits are upcast to fp32 before the log-softmax: a bf16 log-softmax over a large vocabulary
    loses enough precision to turn small reward margins into noise.

    Args:
        logits: (N, T, V) model outputs; position t predicts token t + 1.
        labels: (N, T) the input tokens, with ``IGNORE_INDEX`` on positions not to score.

    Returns:
        ``(logps, mask)``, both (N, T - 1): log p(labels[:, t + 1] | prefix), zeroed where the label
        is ignored, and the boolean mask of scored positions.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (N, T)")
    labels = labels[:, 1:]  # (N, T-1)
    mask = labels != IGNORE_INDEX
    return target_logps(logits[:, :-1], labels.masked_fill(~mask, 0)) * mask, mask


def target_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position, fp32: (..., V) logits and (...) targets -> (...).

    ``cross_entropy`` fuses log-softmax and the gather (less memory and time than
    ``log_softmax(-1).gather``, the same numbers).
    """
    flat = wide(logits.reshape(-1, logits.shape[-1]))  # (M, V)
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def head_logps(logits: Tensor | HeadInputs, targets: Tensor) -> Tensor:
    """log p(target) per position, fp32, from logits (:func:`target_logps`) or a head's inputs (in tiles)."""
    return tiled_logps(logits, targets) if isinstance(logits, HeadInputs) else target_logps(logits, targets)


def sequence_logps(logits: Tensor, labels: Tensor) -> SequenceLogps:
    """Sum and per-token mean of response-token log-probs for each row.

    Args:
        logits: (N, T, V) model outputs.
        labels: (N, T) input tokens with ``IGNORE_INDEX`` on prompt and padding. The first token
            can never be scored (nothing predicts it).

    Returns:
        ``SequenceLogps`` of (N,) tensors. A row with no response token gives 0, never NaN.
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    n_tokens = mask.sum(-1).to(total.dtype)
    return SequenceLogps(sum=total, mean=total / n_tokens.clamp(min=1.0), n_tokens=n_tokens)


def sequence_kl(policy_logits: Tensor, reference_logits: Tensor, labels: Tensor) -> Tensor:
    """Exact KL(policy || reference) of next-token distributions, summed over response positions.

    At every scored position the full-vocabulary KL ``sum_v p(v) (log p(v) - log q(v))`` is taken
    and summed over the row's response positions, teacher-forced on the given tokens. fp32.

    Args:
        policy_logits: (N, T, V).
        reference_logits: (N, T, V).
        labels: (N, T) as in :func:`sequence_logps`.

    Returns:
        (N,) summed KL per row; 0 for a row with no response token.
    """
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(
            f"policy logits {tuple(policy_logits.shape)} and reference logits {tuple(reference_logits.shape)} differ"
        )
    if policy_logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(policy_logits.shape)} and labels {tuple(labels.shape)} disagree on (N, T)")
    logp = policy_logits[:, :-1].float().log_softmax(-1)  # (N, T-1, V)
    logq = reference_logits[:, :-1].float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N, T-1)
    return (kl * (labels[:, 1:] != IGNORE_INDEX)).sum(-1)


def scored_logps(
    logits: Tensor | HeadInputs,
    batch: ScoredBatch,
    *,
    pairs: bool = True,
    unlikelihood: bool = False,
    against: Tensor | HeadInputs | None = None,
    tails: bool = False,
    wpo: bool = False,
) -> PairLogps:
    """Per-pair summed log-probs of the chosen and rejected responses, each (B,).

    Args:
        logits: (R, S, V) at the batch's scored positions, or the head's inputs there, whose
            log-probs are then computed in tiles (:mod:`dpo.maths.tiled`;
            :func:`dpo.models.forward.scored_logits` decides).
        batch: its ``score_tgt`` (R, S) token ids, ``score_seg`` (R, S) segment codes,
            ``score_pair`` (R, S) the pair of each token and ``n_pairs`` (``B``). Rows may hold one
            response (separate layout), one pair or several pairs (the shared-prefix layouts).
        pairs: False for SFT batches (chosen rows only): the rejected fields are then empty (0,).
        unlikelihood: also sum ``log(1 - p)`` over rejected tokens (only the unlikelihood loss
            needs it; :attr:`dpo.maths.losses.LossSpec.needs_unlikelihood`).
        against: the policy's scored logits (or head inputs) when these are the reference's: the
            exact KL(policy || reference) over the chosen tokens is then summed into ``chosen_kl``,
            each tile's reference logits made once for both (no gradient; a metric).
        tails: also sum each response's log-probs past the pair's shared length (LD-DPO's split).
        wpo: also WPO's log pair weight (a tiled pass over the vocabulary for ``sum_v p_v^2``).
    """
    tgt, seg, pair = batch["score_tgt"], batch["score_seg"], batch["score_pair"]
    if logits.shape[:2] != tgt.shape or not tgt.shape == seg.shape == pair.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, score_tgt {tuple(tgt.shape)}, score_seg {tuple(seg.shape)} and "
            f"score_pair {tuple(pair.shape)} disagree on (R, S)"
        )
    n_pairs = batch["n_pairs"]
    kl = None
    if against is not None:
        logps, kl = logps_and_kl(logits, tgt, against, where=seg == CHOSEN)  # (R, S) each
    else:
        logps = head_logps(logits, tgt)  # (R, S)
    chosen, rejected = seg == CHOSEN, seg == REJECTED
    c_sum = per_pair(logps * chosen, pair, n_pairs)
    c_tok = per_pair(chosen.to(c_sum.dtype), pair, n_pairs)
    c_kl = None if kl is None else per_pair(kl * chosen, pair, n_pairs)
    if not pairs:
        empty = c_sum[:0]
        return PairLogps(c_sum, empty, c_tok, empty, chosen_kl=c_kl)
    unlikely = None
    if unlikelihood:
        # log(1 - p), with 1 - p floored at 1e-5 as in Welleck et al.'s unlikelihood code.
        log1m = torch.log((1.0 - logps.exp()).clamp(min=1e-5))  # (R, S)
        unlikely = per_pair(log1m * rejected, pair, n_pairs)
    r_sum = per_pair(logps * rejected, pair, n_pairs)
    r_tok = per_pair(rejected.to(c_sum.dtype), pair, n_pairs)
    out = PairLogps(c_sum, r_sum, c_tok, r_tok, unlikely, c_kl)
    return _with_extras(out, logits, logps, batch, tails=tails, wpo=wpo) if tails or wpo else out


def _with_extras(out: PairLogps, logits: Tensor | HeadInputs, logps: Tensor, batch: ScoredBatch, *, tails: bool,
                 wpo: bool) -> PairLogps:  # fmt: skip
    """``out`` with LD-DPO's tail sums and/or WPO's log pair weights, from the (R, S) token log-probs."""
    seg, pair, n_pairs = batch["score_seg"], batch["score_pair"], batch["n_pairs"]
    chosen, rejected = seg == CHOSEN, seg == REJECTED
    if tails:
        past = past_shared_length(batch)  # (R, S)
        out = out._replace(chosen_tail=per_pair(logps * (chosen & past), pair, n_pairs),
                           rejected_tail=per_pair(logps * (rejected & past), pair, n_pairs))  # fmt: skip
    if wpo:
        # WPO's aligned log-probs log p_t - log sum_v p_v^2, averaged over each response (TRL 1.16's form)
        log_sq = tiled_token_stats(logits.detach(), want=("sum_p2",))["sum_p2"].log()  # (R, S)
        aligned = (logps.detach() - log_sq) * (seg >= 0)
        c_mean = per_pair(aligned * chosen, pair, n_pairs) / out.chosen_tokens.clamp(min=1.0)
        r_mean = per_pair(aligned * rejected, pair, n_pairs) / out.rejected_tokens.clamp(min=1.0)
        out = out._replace(wpo_log_weight=c_mean + r_mean)
    return out


def past_shared_length(batch: ScoredBatch) -> Tensor:
    """(R, S) bool: the scored token is past its pair's shared length ``min(|c|, |r|)`` in its response.

    A token's place in its response is its rank among the tokens of the same (pair, segment) in
    row-major order; every layout keeps a response's tokens in order there (:mod:`dpo.data.batch`).
    """
    seg, pair, n = batch["score_seg"], batch["score_pair"], batch["n_pairs"]
    key = torch.where(seg >= 0, pair * 2 + seg, 2 * n).reshape(-1)  # (M,) padding: one group of its own
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=2 * n + 1)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    lengths = counts[: 2 * n].view(n, 2)  # (B, 2) chosen and rejected tokens of each pair
    shared = lengths.min(dim=1).values  # (B,)
    return ((rank >= shared[pair.reshape(-1).clamp(min=0)]) & (key < 2 * n)).view(seg.shape)


def response_lengths(batch: ScoredBatch) -> tuple[Tensor, Tensor]:
    """Chosen and rejected response lengths in tokens per pair, each (B,) float."""
    seg, pair, n = batch["score_seg"], batch["score_pair"], batch["n_pairs"]
    return per_pair((seg == CHOSEN).float(), pair, n), per_pair((seg == REJECTED).float(), pair, n)


def per_pair(values: Tensor, pair: Tensor, n_pairs: int) -> Tensor:
    """Sum (R, S) per-token ``values`` into (B,) by each token's pair index."""
    return values.new_zeros(n_pairs).index_add(0, pair.reshape(-1), values.reshape(-1))
