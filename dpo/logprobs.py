"""Per-sequence log-probabilities of response tokens under a causal LM.

Shapes: ``N`` rows (``2B`` when chosen and rejected are stacked), ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.attention import Segments


class SequenceLogps(NamedTuple):
    """Log-probabilities of the masked (response) tokens of each row.

    Attributes:
        sum: (N,) sum over response tokens of log p(token | prefix).
        mean: (N,) ``sum / n_tokens``; 0 for a row with no response token.
        n_tokens: (N,) number of response tokens scored, as float.
        unlikely: (N,) sum over response tokens of log(1 - p(token | prefix)) (the unlikelihood
            term), where computed; else None.
    """

    sum: Tensor
    mean: Tensor
    n_tokens: Tensor
    unlikely: Tensor | None = None


IGNORE_INDEX = -100
"""Label value of positions that are not scored (prompt and padding), as in Hugging Face."""


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
    return _target_logps(logits[:, :-1], labels.masked_fill(~mask, 0)) * mask, mask


def _target_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position, fp32: (..., V) logits and (...) targets -> (...).

    ``cross_entropy`` fuses log-softmax and the gather (less memory and time than
    ``log_softmax(-1).gather``, the same numbers).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (M, V)
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


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


def scored_logits(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Logits only at the batch's scored positions: (N, S, V).

    Runs the model's backbone once over ``input_ids`` (with the batch's 2D padding mask, the
    shared-prefix layout's 4D mask and position ids, or the padding-free layout's ``segments``),
    gathers the hidden states at ``score_pos`` and applies the LM head there alone, so the head
    and log-softmax never touch prompt positions: the same numbers as the full forward, with less
    work (the head is a large share of a small model's FLOPs). Models whose logits are more than
    ``head(hidden)`` (soft-capping, a logit scale), and FSDP2-sharded models, take the full
    forward, then the gather.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay active
    mask = batch["attention_mask"]  # (N, T) padding mask, or (N, 1, T, T) bool when packed
    if mask.dim() == 4 and inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(inner.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch.get("position_ids")}
    segments = None
    if "segments" in batch:  # padding-free: attention pair by pair (dpo.attention)
        segments = inputs["segments"] = Segments(batch["segments"].tolist())
    score_pos = batch["score_pos"]  # (N, S)
    if not _plain_head(inner.config) or _is_fsdp(model):
        logits = model(**inputs).logits  # (N, T, V)
        out = torch.gather(logits, 1, score_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    else:
        hidden = inner.base_model(**inputs).last_hidden_state  # (N, T, H)
        pos = score_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (N, S, H)
        out = inner.get_output_embeddings()(torch.gather(hidden, 1, pos))  # (N, S, V)
    if segments is not None:
        _check_segments_used(inner.config, segments)
    return out


def _check_segments_used(config: Any, segments: Segments) -> None:
    """A model that didn't hand ``segments`` to each attention layer let pairs see each other: refuse."""
    layers = getattr(config, "num_hidden_layers", None)
    if segments.calls == 0 or (layers is not None and segments.calls != layers):
        raise RuntimeError(
            f"data.layout=padding_free: {segments.calls} attention layers of {layers} ran pair by pair "
            f"(attention implementation {config._attn_implementation!r}); this model needs "
            "data.layout=shared_prefix"
        )


def _is_fsdp(model: Any) -> bool:
    """FSDP2 gathers the root's parameters in the root's forward: the backbone can't run alone."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _plain_head(config: Any) -> bool:
    """Whether the model's logits are exactly its output embedding applied to the last hidden state."""
    scale = getattr(config, "logit_scale", None)
    return not getattr(config, "final_logit_softcapping", None) and scale in (None, 1, 1.0)


def scored_logps(logits: Tensor, batch: dict[str, Tensor]) -> tuple[SequenceLogps, SequenceLogps]:
    """Per-pair :class:`SequenceLogps` of the chosen and rejected responses, each (B,).

    Args:
        logits: (R, S, V) from :func:`scored_logits`.
        batch: its ``score_tgt`` (R, S) token ids, ``score_seg`` (R, S) 0 chosen / 1 rejected /
            -1 padding, ``score_pair`` (R, S) the pair of each token and ``n_pairs`` (``B``). Rows
            may hold one response (separate layout), one pair or several pairs (packed layouts).
    """
    tgt, seg, pair = batch["score_tgt"], batch["score_seg"], batch["score_pair"]
    if logits.shape[:2] != tgt.shape or not tgt.shape == seg.shape == pair.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, score_tgt {tuple(tgt.shape)}, score_seg {tuple(seg.shape)} and "
            f"score_pair {tuple(pair.shape)} disagree on (R, S)"
        )
    logps = _target_logps(logits, tgt)  # (R, S)
    # log(1 - p), with 1 - p floored at 1e-5 as in Welleck et al.'s unlikelihood code.
    log1m = torch.log((1.0 - logps.exp()).clamp(min=1e-5))  # (R, S)
    out = []
    for segment in (0, 1):  # chosen, rejected (dpo.data.packing.CHOSEN / REJECTED)
        mask = seg == segment
        total = per_pair(logps * mask, pair, batch["n_pairs"])
        n = per_pair(mask.to(total.dtype), pair, batch["n_pairs"])
        unlikely = per_pair(log1m * mask, pair, batch["n_pairs"])
        out.append(SequenceLogps(sum=total, mean=total / n.clamp(min=1.0), n_tokens=n, unlikely=unlikely))
    return out[0], out[1]


def per_pair(values: Tensor, pair: Tensor, n_pairs: int) -> Tensor:
    """Sum (R, S) per-token ``values`` into (B,) by each token's pair index."""
    return values.new_zeros(n_pairs).index_add(0, pair.reshape(-1), values.reshape(-1))


def scored_kl(policy_logits: Tensor, reference_logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """:func:`sequence_kl` on scored logits (R, S, V): the KL summed over each pair's chosen tokens, (B,)."""
    logp = policy_logits.float().log_softmax(-1)
    logq = reference_logits.float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (R, S)
    return per_pair(kl * (batch["score_seg"] == 0), batch["score_pair"], batch["n_pairs"])
