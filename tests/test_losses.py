"""Losses against hand-derived values and the invariants every preference loss must satisfy.

Common numbers (one pair unless said): policy chosen pc = -1, rejected pr = -3; reference
rc = rr = -2; |c| = 2, |r| = 4 tokens. Then h = (pc - rc) - (pr - rr) = 1 - (-1) = 2.
-log s(1) = log(1 + e^-1) = 0.31326168751822286; -log s(-1) = 1 + 0.31326... = 1.31326168751822286.
Log-ratios lc = pc - rc = 1, lr = pr - rr = -1; per token lc / |c| = 0.5, lr / |r| = -0.25.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo.maths.losses import (
    LOSSES,
    PairLogps,
    check_loss_params,
    compute_loss,
    get_loss,
)

NLS1 = math.log1p(math.exp(-1))  # -log s(1)
NLSM1 = 1 + NLS1  # -log s(-1)


def s(x):
    return 1 / (1 + math.exp(-x))


def nls(x):
    """-log s(x)."""
    return math.log1p(math.exp(-x))


def log_odds(m):
    """log(p / (1 - p)) of p = e^m."""
    return m - math.log(1 - math.exp(m))



def pair(c, r, nc=2.0, nr=4.0, grad=False) -> PairLogps:
    """A one-pair batch; the rejected response's tokens each have probability exp(r / nr), so its
    unlikelihood term is nr * log(1 - exp(r / nr))."""
    t = lambda x: torch.tensor([x], dtype=torch.float64, requires_grad=grad)  # noqa: E731
    rejected = t(r)
    n = torch.tensor([nr], dtype=torch.float64)
    unlikely = n * torch.log1p(-torch.exp(rejected / n))
    return PairLogps(t(c), rejected, torch.tensor([nc], dtype=torch.float64), n, unlikely)


POLICY = pair(-1.0, -3.0)
REF = pair(-2.0, -2.0)


@pytest.mark.parametrize(
    ("name", "params", "expected", "doc"),
    [
        ("dpo", {"beta": 0.5}, NLS1, "-log s(0.5 * 2) = -log s(1)"),
        (
            "cdpo",
            {"beta": 0.5, "label_smoothing": 0.1},
            0.9 * NLS1 + 0.1 * NLSM1,
            "0.9*0.31326 + 0.1*1.31326 = 0.41326",
        ),
        (
            "robust_dpo",
            {"beta": 0.5, "label_smoothing": 0.1},
            (0.9 * NLS1 - 0.1 * NLSM1) / 0.8,
            "(0.9*0.31326 - 0.1*1.31326) / 0.8 = 0.18826",
        ),
        ("ipo_sum", {"beta": 0.5}, 1.0, "(h - 1/(2*0.5))^2 = (2 - 1)^2 = 1"),
        (
            "ipo_length_norm",
            {"beta": 0.5},
            0.0625,
            "h_norm = (-1/2 + 2/2) - (-3/4 + 2/4) = 0.5 + 0.25 = 0.75; (0.75 - 1)^2 = 0.0625",
        ),
        ("hinge", {"beta": 0.25}, 0.5, "max(0, 1 - 0.25 * 2) = 0.5"),
        ("ref_free_dpo", {"beta": 0.5}, NLS1, "-log s(0.5 * (-1 - -3)) = -log s(1)"),
        ("simpo", {"beta": 2.0, "gamma": 0.5}, math.log(2), "2*(-1/2) - 2*(-3/4) - 0.5 = 0; -log s(0) = ln 2"),
        ("sft", {}, 1.0, "-pc = 1"),
        ("sft_token_mean", {}, 0.5, "-pc * B / sum|c| = 1 * 1 / 2"),
        ("sigmoid_norm", {"beta": 0.5}, nls(0.375), "-log s(0.5 * (1/2 - (-1/4))) = -log s(0.375)"),
        (
            "exo_pair",
            {"beta": 0.5, "label_smoothing": 0.1},
            s(1) * (math.log(s(1)) - math.log(0.9)) + s(-1) * (math.log(s(-1)) - math.log(0.1)),
            "q = s(0.5 * 2): q (log q - log 0.9) + (1 - q) (log(1 - q) - log 0.1) = 0.49203",
        ),
        (
            "discopop",
            {"beta": 0.5, "tau": 0.05},
            (1 - s(20)) * NLS1 + s(20) * math.exp(-1),
            "x = 1, m = s(1 / 0.05) = s(20): (1 - m) * 0.31326 + m * e^-1 = 0.36788",
        ),
        ("aot", {"beta": 0.5, "label_smoothing": 0.1}, 0.9 * NLS1 + 0.1 * NLSM1, "one pair: d = 2 - 0, as cDPO"),
        ("aot_unpaired", {"beta": 0.5, "label_smoothing": 0.0}, NLS1, "one pair: d = lc - lr = 2; -log s(1)"),
        ("nca_pair", {"beta": 0.5}, 1.5 * nls(0.5) + 0.5 * nls(-0.5), "-log s(.5) - .5 log s(-.5) - .5 log s(.5)"),
        ("bco_pair", {"beta": 0.5}, 2 * nls(0.5), "-log s(0.5 * 1) - log s(-0.5 * -1)"),
        ("sppo_hard", {"beta": 0.25}, 2.0, "(1 - 1/(2*0.25))^2 + (-1 + 2)^2 = 1 + 1"),
        ("apo_zero", {"beta": 0.5}, 1 - s(0.5) + s(-0.5), "1 - s(0.5 * 1) + s(0.5 * -1) = 0.75508"),
        ("apo_down", {"beta": 0.5}, s(0.5) + 1 - s(1), "s(0.5) + 1 - s(0.5 * 2) = 0.89137"),
        ("cpo", {"beta": 0.5, "alpha": 1.0}, NLS1 + 0.5, "-log s(0.5 * (-1 + 3)) + 1 * (1 / 2)"),
        (
            "orpo",
            {"beta": 0.5},
            0.5 + 0.5 * nls(log_odds(-0.5) - log_odds(-0.75)),
            "NLL 1/2; log odds(c) = -1/2 - log(1 - e^-1/2), (r) the same at -3/4: 0.5 - 0.5 log s(0.5041) = 0.74",
        ),
        (
            "unlikelihood",
            {"alpha": 0.5},
            1.0 - 0.5 * 4 * math.log(1 - math.exp(-0.75)),
            "-pc - alpha * 4 log(1 - e^(-3/4)) = 1 + 0.5 * 4 * 0.63934 = 2.27868",
        ),
    ],
)
def test_hand_derived_values(name, params, expected, doc):
    reference = REF if get_loss(name).needs_reference else None
    out = compute_loss(name, POLICY, reference, params)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12), doc


def test_every_registered_loss_has_a_hand_derived_test():
    tested = {
        "dpo", "cdpo", "robust_dpo", "ipo_sum", "ipo_length_norm", "hinge", "ref_free_dpo", "simpo", "sft",
        "unlikelihood", "sft_token_mean", "sigmoid_norm", "exo_pair", "discopop", "aot", "aot_unpaired", "nca_pair",
        "bco_pair", "sppo_hard", "apo_zero", "apo_down", "cpo", "orpo",
    }  # fmt: skip
    assert set(LOSSES) == tested


def test_nll_weight_adds_length_normalised_chosen_nll():
    """RPO: dpo + 1.0 * (-pc / |c|) = 0.31326 + 1/2."""
    out = compute_loss("dpo", POLICY, REF, {"beta": 0.5}, nll_weight=1.0)
    assert out.losses.item() == pytest.approx(NLS1 + 0.5, abs=1e-12)


def test_dpo_rewards_are_beta_log_ratios():
    """Chosen reward 0.5 * (-1 + 2) = 0.5, rejected 0.5 * (-3 + 2) = -0.5."""
    out = compute_loss("dpo", POLICY, REF, {"beta": 0.5})
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


REF_LOSSES = [n for n, s in LOSSES.items() if s.needs_reference]
DEFAULT_PARAMS = {"beta": 0.1, "label_smoothing": 0.1, "gamma": 0.5, "alpha": 0.5, "tau": 0.05}


def params_for(name):
    return {k: DEFAULT_PARAMS[k] for k in get_loss(name).param_names}


def test_dpo_is_ln2_with_zero_rewards_when_policy_equals_reference():
    torch.manual_seed(0)
    logps = PairLogps(torch.randn(8), torch.randn(8), torch.full((8,), 5.0), torch.full((8,), 7.0))
    for name in ("dpo", "cdpo", "robust_dpo"):
        out = compute_loss(name, logps, logps, params_for(name))
        torch.testing.assert_close(out.losses, torch.full((8,), math.log(2)))
        assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


@pytest.mark.parametrize("name", [n for n in LOSSES if get_loss(n).needs_pairs and n not in ("apo_down", "discopop")])
def test_rewards_carry_no_grad_and_gradient_signs(name):
    """Raising the chosen log-prob lowers the loss, raising the rejected one raises it (APO-down and
    DiscoPOP break this on purpose: their own tests)."""
    policy = pair(-1.0, -1.5, grad=True)  # a margin where no loss is saturated
    reference = pair(-1.2, -1.2) if get_loss(name).needs_reference else None
    out = compute_loss(name, policy, reference, params_for(name))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert policy.chosen.grad.item() < 0
    assert policy.rejected.grad.item() > 0


def test_apo_down_lowers_both_likelihoods_and_discopop_is_not_monotone():
    """APO-down: moving both log-ratios up by the same amount raises the loss (d/dlc + d/dlr =
    beta s'(beta lc) > 0), while the rejected one alone raises it too. DiscoPOP (non-convex by design):
    near a margin of tau it is not monotone: at x = beta h = tau the chosen gradient is positive,
    while far on either side it is the logistic (x << 0) or exp(-x) (x >> 0), both decreasing."""
    policy = pair(-1.0, -1.5, grad=True)
    out = compute_loss("apo_down", policy, REF, {"beta": 0.5})
    out.losses.sum().backward()
    assert policy.chosen.grad.item() + policy.rejected.grad.item() > 0 and policy.rejected.grad.item() > 0
    for margin, sign in ((0.1, 1.0), (-20.0, -1.0), (20.0, -1.0)):  # beta 0.5: x = 0.05 = tau, -10, 10
        policy = pair(-2.0 + margin, -2.0, grad=True)
        compute_loss("discopop", policy, REF, {"beta": 0.5, "tau": 0.05}).losses.sum().backward()
        assert policy.chosen.grad.item() * sign > 0, margin


def test_label_smoothing_equals_its_closed_form():
    """cDPO is binary cross-entropy of the logit beta*h against the soft target 1 - eps."""
    torch.manual_seed(1)
    policy = PairLogps(torch.randn(16), torch.randn(16), torch.ones(16), torch.ones(16))
    reference = PairLogps(torch.randn(16), torch.randn(16), torch.ones(16), torch.ones(16))
    beta, eps = 0.3, 0.2
    h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    expected = F.binary_cross_entropy_with_logits(beta * h, torch.full((16,), 1 - eps), reduction="none")
    out = compute_loss("cdpo", policy, reference, {"beta": beta, "label_smoothing": eps})
    torch.testing.assert_close(out.losses, expected)
    # eps = 0 is plain DPO; robust DPO differs from cDPO for eps > 0.
    plain = compute_loss("cdpo", policy, reference, {"beta": beta, "label_smoothing": 0.0}).losses
    torch.testing.assert_close(plain, compute_loss("dpo", policy, reference, {"beta": beta}).losses)
    robust = compute_loss("robust_dpo", policy, reference, {"beta": beta, "label_smoothing": eps}).losses
    assert not torch.allclose(robust, out.losses)


def test_robust_dpo_is_unbiased_under_label_flips():
    """E over a flip with prob eps of the robust loss equals the clean DPO loss (paper's Lemma)."""
    torch.manual_seed(2)
    p = PairLogps(torch.randn(8), torch.randn(8), torch.ones(8), torch.ones(8))
    r = PairLogps(torch.randn(8), torch.randn(8), torch.ones(8), torch.ones(8))
    flipped = lambda x: PairLogps(x.rejected, x.chosen, x.rejected_tokens, x.chosen_tokens)  # noqa: E731
    eps, params = 0.2, {"beta": 0.5, "label_smoothing": 0.2}
    expected = (1 - eps) * compute_loss("robust_dpo", p, r, params).losses + eps * compute_loss(
        "robust_dpo", flipped(p), flipped(r), params
    ).losses
    torch.testing.assert_close(expected, compute_loss("dpo", p, r, {"beta": 0.5}).losses)


def test_ipo_sum_and_length_norm_differ_exactly_as_their_formulas():
    """With every response L tokens long, h_norm = h / L; with L = 1 the two forms coincide."""
    torch.manual_seed(3)
    vals = [torch.randn(6) for _ in range(4)]
    for length in (1.0, 3.0):
        n = torch.full((6,), length)
        p, r = PairLogps(vals[0], vals[1], n, n), PairLogps(vals[2], vals[3], n, n)
        beta = 0.25
        h = (p.chosen - r.chosen) - (p.rejected - r.rejected)
        torch.testing.assert_close(compute_loss("ipo_sum", p, r, {"beta": beta}).losses, (h - 2.0) ** 2)
        torch.testing.assert_close(
            compute_loss("ipo_length_norm", p, r, {"beta": beta}).losses, (h / length - 2.0) ** 2
        )


def test_reference_losses_refuse_to_run_without_reference():
    for name in REF_LOSSES:
        with pytest.raises(ValueError, match="needs reference"):
            compute_loss(name, POLICY, None, params_for(name))


def test_needs_reference_is_a_property_of_the_variant():
    free = {n for n, spec in LOSSES.items() if not spec.needs_reference}
    assert free == {"ref_free_dpo", "simpo", "sft", "sft_token_mean", "unlikelihood", "cpo", "orpo"}
    assert not get_loss("sft").needs_pairs


def test_loss_params_are_checked_by_name():
    with pytest.raises(ValueError, match="betta"):
        check_loss_params("dpo", {"betta": 0.1})
    with pytest.raises(ValueError, match="gamma"):
        check_loss_params("simpo", {"beta": 2.0})
    with pytest.raises(ValueError, match="label_smoothing"):
        check_loss_params("robust_dpo", {"beta": 0.1, "label_smoothing": 0.5})
    with pytest.raises(KeyError, match="registered"):
        get_loss("dpoo")


def test_unlikelihood_term_comes_from_the_token_probabilities(tiny_model, bpe_tokenizer):
    """The unlikelihood term of a scored batch is sum_t log(1 - p_t) over the rejected tokens."""
    from dpo.data.collate import collate
    from dpo.data.sources import PreferenceRow
    from dpo.data.tokenize import PairTokenizer
    from dpo.maths.logprobs import scored_logps, sequence_logps
    from dpo.models.forward import scored_logits

    pt = PairTokenizer(bpe_tokenizer, 64, 16, "keep_end")
    batch = collate([pt(PreferenceRow("Review it:", "A fine film.", "Dull and long.", "a"))], pad_id=0)
    with torch.no_grad():
        logits = scored_logits(tiny_model, batch)
        assert scored_logps(logits, batch).rejected_unlikely is None  # only the unlikelihood loss pays for it
        unlikely = scored_logps(logits, batch, unlikelihood=True).rejected_unlikely
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][1:, 1:]  # the rejected row's scored tokens
    logp = logits[1:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (torch.log1p(-logp.exp()) * (labels != -100)).sum()
    torch.testing.assert_close(unlikely[0], expected, atol=1e-5, rtol=1e-5)
    assert sequence_logps(logits[1:], batch["labels"][1:]).sum[0] < 0
