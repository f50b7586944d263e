"""Log-probs through the LM head in tiles (dpo.maths.tiled) against the full logits."""

from __future__ import annotations

import pytest
import torch

from dpo.maths.logprobs import target_logps
from dpo.maths.tiled import HeadInputs, tiled_logps, tiled_token_stats


def head_and_targets(bias: bool = True, m: int = 37, h: int = 16, v: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    return hidden, weight, b, targets


def full_logps(hidden, weight, bias, targets):
    return target_logps(torch.nn.functional.linear(hidden, weight, bias), targets)


@pytest.mark.parametrize("tile", [1, 8, 37, 64])  # single tokens, uneven tiles (37 = 4 x 8 + 5), one tile, larger
@pytest.mark.parametrize("bias", [True, False])
def test_per_token_logps_and_gradients_equal_the_full_logits_in_fp32(tile, bias):
    """Per-token values are compared elementwise (rtol 1e-6); gradients with rtol 1e-6 and an atol of
    1e-6 of the largest entry, since the weight's gradient sums the tiles in another order than one
    matmul does (rounding of a sum of 37 terms, ~1e-7 relative in fp32)."""
    hidden, weight, b, targets = head_and_targets(bias)
    upstream = torch.randn(len(targets), generator=torch.Generator().manual_seed(1))
    ours = tiled_logps(HeadInputs(hidden, weight, b), targets, tile=tile)
    grads = torch.autograd.grad((ours * upstream).sum(), [hidden, weight, *([b] if bias else [])])
    ref = full_logps(hidden, weight, b, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight, *([b] if bias else [])])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * r.abs().max().item())


def test_the_shape_of_the_targets_is_kept_and_a_mismatch_is_named():
    hidden, weight, b, targets = head_and_targets(m=12)
    out = tiled_logps(HeadInputs(hidden.view(3, 4, -1), weight, b), targets.view(3, 4), tile=5)
    assert out.shape == (3, 4)
    with pytest.raises(ValueError, match=r"hidden \(3, 4, 16\) and targets \(11,\) disagree"):
        tiled_logps(HeadInputs(hidden.view(3, 4, -1), weight, b), targets[:11], tile=5)


def test_token_stats_equal_entropy_squared_mass_and_kl_of_the_full_distributions():
    hidden, weight, b, _ = head_and_targets()
    other_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
    stats = tiled_token_stats(HeadInputs(hidden, weight, b), HeadInputs(other_hidden, weight, b), tile=8)
    logp = torch.nn.functional.linear(hidden, weight, b).log_softmax(-1)
    logq = torch.nn.functional.linear(other_hidden, weight, b).log_softmax(-1)
    p = logp.exp()
    torch.testing.assert_close(stats["entropy"], -(p * logp).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["sum_p2"], (p * p).sum(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["kl"], (p * (logp - logq)).sum(-1), rtol=1e-4, atol=1e-6)
    assert not stats["kl"].requires_grad


def test_under_bf16_autocast_the_tiles_compute_as_the_head_would():
    """nn.Linear under CPU autocast multiplies in bf16; the tiles cast the same way, so the logits are
    the same bf16 numbers and the log-probs agree to fp32 rounding of the log-softmax."""
    hidden, weight, b, targets = head_and_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tiled_logps(HeadInputs(hidden, weight, b), targets, tile=8)
        ref = target_logps(torch.nn.functional.linear(hidden, weight, b), targets)
        (g_ours,) = torch.autograd.grad(ours.sum(), [hidden])
        (g_ref,) = torch.autograd.grad(ref.sum(), [hidden])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-2, atol=1e-2 * g_ref.abs().max().item())


@pytest.mark.parametrize("as_head", [True, False])
def test_reference_logps_and_kl_in_one_loop_equal_the_full_distributions(as_head):
    """The reference's pass also measures KL(policy || reference) (dpo.maths.logprobs.scored_logps'
    ``against``): its log-probs equal target_logps and its KL the full-vocabulary sum, from head
    inputs (tiles of 8 tokens) or from logits."""
    from dpo.maths.tiled import logps_and_kl

    hidden, weight, b, targets = head_and_targets()
    policy_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
    ref, pol = HeadInputs(hidden.detach(), weight.detach(), b.detach()), HeadInputs(policy_hidden, weight.detach(), b)
    ref_logits = torch.nn.functional.linear(hidden, weight, b).detach()
    pol_logits = torch.nn.functional.linear(policy_hidden, weight, b).detach()
    logps, kl = logps_and_kl(ref, targets, pol, tile=8) if as_head else logps_and_kl(ref_logits, targets, pol_logits)
    logp, logq = pol_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    torch.testing.assert_close(logps, target_logps(ref_logits, targets), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, (logp.exp() * (logp - logq)).sum(-1), rtol=1e-4, atol=1e-5)
    assert (kl >= -1e-5).all()
    # only where asked (the chosen tokens): the same values there, 0 elsewhere
    where = torch.rand(targets.shape) < 0.5
    where.view(-1)[:8] = False  # a whole tile with nothing asked
    args = (ref, targets, pol) if as_head else (ref_logits, targets, pol_logits)
    logps_there, kl_there = logps_and_kl(*args, where=where, tile=8)
    torch.testing.assert_close(logps_there, logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl_there, torch.where(where, kl, 0.0), rtol=1e-5, atol=1e-6)
