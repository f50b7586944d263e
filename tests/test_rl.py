"""PPO's maths (dpo.maths.rl): GAE against a brute-force loop, the clipped losses and the KL shaping by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.maths.rl import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    shaped_rewards,
    whiten,
)


def brute_force_gae(rewards, values, length, gamma, lam):
    """GAE of one response of ``length`` tokens by its definition: A_t = sum_k (gamma lam)^k delta_{t+k},
    delta_t = r_t + gamma V_{t+1} - V_t, V after the last token 0."""
    deltas = []
    for t in range(length):
        next_value = values[t + 1] if t + 1 < length else 0.0
        deltas.append(rewards[t] + gamma * next_value - values[t])
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_brute_force_sum_on_random_masked_rows(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 7]
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    rewards = torch.randn(4, width) * mask
    values = torch.randn(4, width)  # garbage on padding: must be ignored
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = brute_force_gae(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
        assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[i, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[i, :n].tolist(), strict=True)], abs=1e-5
        )
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_zero_values_is_the_return_to_go():
    """lam=1, gamma=1, V=0: A_t = sum of the rewards from t on. Rewards [1, 2, 3] -> [6, 5, 3]."""
    advantages, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.ones(1, 3), 1.0, 1.0)
    assert advantages.tolist() == [[6.0, 5.0, 3.0]]


def test_kl_shaping_by_hand():
    """kl_coef 0.5; row 0 has 3 tokens with log pi - log pi_ref = [0.2, -0.4, 1.0] and score 2:
    r = [-0.1, 0.2, -0.5 + 2] = [-0.1, 0.2, 1.5]. Row 1 has 1 token, log-ratio 0.6, score -1:
    r = [-0.3 - 1] = [-1.3], then padding 0."""
    logps = torch.tensor([[0.2, -0.4, 1.0], [0.6, 9.0, 9.0]])
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = shaped_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.5)
    assert rewards.flatten().tolist() == pytest.approx([-0.1, 0.2, 1.5, -1.3, 0.0, 0.0])
    # Summed over a response the penalty is kl_coef times the sequence's Monte-Carlo KL.
    assert rewards[0].sum().item() == pytest.approx(2.0 - 0.5 * (0.2 - 0.4 + 1.0))
    with pytest.raises(ValueError, match="at least one token"):
        shaped_rewards(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_clipped_policy_loss_by_hand():
    """eps 0.2, three tokens, ratios e^{log r}:
    token 0: r = 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped term larger: clipped)
    token 1: r = 0.5, A = +1: max(-0.5, -0.8) = -0.5 (unclipped)
    token 2: r = 0.5, A = -2: max(1.0, 1.6) = 1.6 (clipped)
    token 3: padding (ignored). loss = (-1.2 - 0.5 + 1.6) / 3 = -0.0333..., clip_frac = 2/3."""
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 7.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.6) / 3, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 0.5)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 3, abs=1e-6)


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
    new = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_()
    clipped_policy_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2).loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0  # raising log pi of a positive-advantage token lowers the loss


def test_clipped_value_loss_by_hand():
    """eps 0.2; V_old = [0, 0], V = [1, 0.1], R = [2, -1]:
    token 0: unclipped (1 - 2)^2 = 1, clipped V = 0.2: (0.2 - 2)^2 = 3.24 -> 3.24
    token 1: unclipped (0.1 + 1)^2 = 1.21, clipped V = 0.1 (inside): 1.21 -> 1.21
    loss = 0.5 * (3.24 + 1.21) / 2 = 1.1125."""
    loss = clipped_value_loss(torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]),
                              torch.ones(1, 2), clip=0.2)  # fmt: skip
    assert loss.item() == pytest.approx(1.1125, abs=1e-6)


def test_whiten_and_explained_variance():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w = whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4) and w[0, 3] == 0
    assert explained_variance(x, x, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 2.0), x, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_moves_towards_the_target():
    """Ziegler et al.: coef *= 1 + clip(kl/target - 1, +-0.2) * n / horizon."""
    fixed = KLController(0.1)
    fixed.update(kl=50.0, n=100)
    assert fixed.coef == 0.1
    ctl = KLController(0.1, target=6.0, horizon=1000)
    ctl.update(kl=12.0, n=100)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert ctl.coef == pytest.approx(0.102)
    ctl.update(kl=4.5, n=100)  # error -0.25 -> -0.2: 0.102 * 0.98
    assert ctl.coef == pytest.approx(0.102 * 0.98)
    with pytest.raises(ValueError):
        KLController(0.1, target=0.0)


@pytest.mark.parametrize("mode", ["scale", "standardize"])
def test_reward_normalizer_uses_the_moments_of_every_score_so_far(mode):
    """Merged batch by batch, the running mean and (population) variance equal those of all the
    scores at once; the scores are divided by that std, and centred by that mean when standardised."""
    from dpo.maths.rl import RewardNormalizer

    torch.manual_seed(0)
    batches = [torch.randn(n) * s + m for n, s, m in ((5, 1.0, 0.0), (1, 1.0, 3.0), (12, 4.0, -2.0))]
    norm = RewardNormalizer(mode)
    for b in batches:
        norm.update(b.mean().item(), b.var(unbiased=False).item(), len(b))
    every = torch.cat(batches).double()
    assert norm.count == len(every)
    assert norm.mean == pytest.approx(every.mean().item(), rel=1e-6)
    assert norm.var == pytest.approx(every.var(unbiased=False).item(), rel=1e-6)
    x = torch.tensor([0.5, -1.0, 2.0])
    want = (x - every.mean().float()) if mode == "standardize" else x
    torch.testing.assert_close(norm(x), want / every.std(unbiased=False).float(), rtol=1e-5, atol=1e-6)
    restored = RewardNormalizer(mode)
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored(x), norm(x))


def test_reward_normalizer_leaves_scores_alone_without_spread_or_mode():
    from dpo.maths.rl import RewardNormalizer

    x = torch.tensor([1.0, 2.0])
    none = RewardNormalizer("none")
    none.update(5.0, 9.0, 10)
    assert torch.equal(none(x), x)
    flat = RewardNormalizer("scale")
    flat.update(3.0, 0.0, 4)  # every score so far equal: std 0 divides by 1
    assert torch.equal(flat(x), x)
    with pytest.raises(ValueError, match="reward_norm must be one of"):
        RewardNormalizer("zscore")


# --- critic-free policy gradients (GRPO, RLOO) ----------------------------------------------------


def test_group_advantages_by_hand_and_by_brute_force():
    """Group [1, 2, 3, 6] (mean 3, Bessel std sqrt(14/3) = 2.1602): GRPO ``(r - 3) / (2.1602 + 1e-4)``;
    Dr. GRPO ``r - 3``; RLOO ``r_i - mean of the other three``: 1 - 11/3 = -8/3, 2 - 10/3, 3 - 3, 6 - 2."""
    from dpo.maths.rl import group_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = (14 / 3) ** 0.5
    grpo = group_advantages(r, 4, "mean", scale=True)
    assert grpo[:4].tolist() == pytest.approx([(x - 3) / (std + 1e-4) for x in (1, 2, 3, 6)], rel=1e-6)
    assert grpo[4:].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing (no division by 0)
    assert group_advantages(r, 4, "mean", scale=False)[:4].tolist() == [-2.0, -1.0, 0.0, 3.0]
    rloo = group_advantages(r, 4, "leave_one_out", scale=False)
    assert rloo[:4].tolist() == pytest.approx([-8 / 3, 2 - 10 / 3, 0.0, 4.0])
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(15, generator=g)
    brute = [float(scores[i] - torch.cat([scores[(i // 5) * 5 : i], scores[i + 1 : (i // 5 + 1) * 5]]).mean())
             for i in range(15)]  # fmt: skip
    assert group_advantages(scores, 5, "leave_one_out", scale=False).tolist() == pytest.approx(brute, abs=1e-6)
    with pytest.raises(ValueError, match="groups of k=4"):
        group_advantages(torch.zeros(6), 4, "mean", scale=False)


def test_kl_estimators_by_hand_and_their_means_match_the_exact_kl():
    """log pi = log 0.5, log pi_ref = log 0.25 at a token: log r = log 0.5, k1 = log 2 = 0.6931,
    k2 = 0.2402, k3 = 0.5 - 1 + 0.6931 = 0.1931. Over samples of pi, k1 and k3 average to KL(pi||ref)."""
    from dpo.maths.rl import kl_estimate

    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    pi, pref = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = float((pi * (pi / pref).log()).sum())
    # the expectation under pi, exactly: sum_x pi(x) k(x)
    for est in ("k1", "k3"):
        mean = float((pi * kl_estimate(pi.log()[None], pref.log()[None], est)[0]).sum())
        assert mean == pytest.approx(exact, rel=1e-6), est
    with pytest.raises(ValueError, match="kl estimator"):
        kl_estimate(lp, ref, "k4")


def test_loss_aggregations_by_hand():
    """Rows of 1 and 3 tokens, losses [2] and [1, 1, 4]: grpo (2/1 + 6/3) / 2 = 2; dapo 8 / 4 = 2.0;
    dr_grpo 8 / (2 x 4 max tokens) = 1; dapo with every rank's 8 tokens: 8 / 8 = 1."""
    from dpo.maths.rl import aggregate

    per_token = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert aggregate(per_token, mask, "grpo", 4).item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "dapo", 4).item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "dr_grpo", 4).item() == pytest.approx(1.0)
    assert aggregate(per_token, mask, "dapo", 4, total_tokens=torch.tensor(8.0)).item() == pytest.approx(1.0)
    # a 3-token response of loss 3 per token beside a 1-token one of 0: grpo weighs each response
    # equally, (3 + 0) / 2 = 1.5; dapo each token, 9 / 4 = 2.25
    losses, lengths = torch.tensor([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    assert aggregate(losses, lengths, "grpo", 3).item() == pytest.approx(1.5)
    assert aggregate(losses, lengths, "dapo", 3).item() == pytest.approx(2.25)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further():
    """Ratio 1.25 (> 1 + 0.2) with advantage +1: clipped at 1.2 symmetric, at 1.25 under clip_high 0.28."""
    from dpo.maths.rl import clipped_token_losses

    lp, old, adv, m = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    sym, clipped, _ = clipped_token_losses(lp, old, adv, m, 0.2)
    high, not_clipped, _ = clipped_token_losses(lp, old, adv, m, 0.2, clip_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and clipped.item() == 1.0
    assert high.item() == pytest.approx(-1.25) and not_clipped.item() == 0.0
