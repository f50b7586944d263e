"""Sequence log-probs and KL against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.data.batch import IGNORE_INDEX
from dpo.maths.logprobs import sequence_kl, sequence_logps


def brute_force(logits, labels):
    sums, counts = [], []
    for n in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            if labels[n, t] == IGNORE_INDEX:
                continue
            row = logits[n, t - 1].double()
            total += (row[labels[n, t]] - math.log(row.exp().sum().item())).item()
            count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def test_matches_brute_force_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    labels[2, :1] = IGNORE_INDEX
    out = sequence_logps(logits, labels)
    sums, counts = brute_force(logits, labels)
    torch.testing.assert_close(out.sum.double(), sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.n_tokens.double(), counts)
    torch.testing.assert_close(out.mean.double(), sums / counts, atol=1e-5, rtol=1e-5)


def test_bf16_logits_are_scored_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 5))
    out = sequence_logps(logits, labels)
    assert out.sum.dtype == torch.float32
    sums, _ = brute_force(logits.float(), labels)
    torch.testing.assert_close(out.sum.double(), sums, atol=1e-5, rtol=1e-5)


def test_fully_masked_row_gives_zero_not_nan():
    logits = torch.randn(2, 4, 5)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[1, 2:] = 3
    out = sequence_logps(logits, labels)
    assert out.sum[0].item() == 0 and out.mean[0].item() == 0 and out.n_tokens[0].item() == 0
    assert torch.isfinite(out.mean).all()
    assert sequence_kl(logits, logits + 1.0, labels)[0].item() == 0


def test_shape_mismatch_raises_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 5\).*\(2, 3\)"):
        sequence_logps(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="differ"):
        sequence_kl(torch.randn(2, 4, 5), torch.randn(2, 4, 6), torch.zeros(2, 4, dtype=torch.long))


def test_kl_matches_brute_force_and_is_zero_for_equal_models():
    torch.manual_seed(0)
    p, q = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    labels = torch.randint(0, 6, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    expected = []
    for n in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[n, t] == IGNORE_INDEX:
                continue
            lp, lq = p[n, t - 1].log_softmax(-1), q[n, t - 1].log_softmax(-1)
            total += (lp.exp() * (lp - lq)).sum().item()
        expected.append(total)
    torch.testing.assert_close(sequence_kl(p, q, labels), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert torch.all(sequence_kl(p, p, labels) == 0)
