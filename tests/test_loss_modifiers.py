"""The modifiers any loss takes (f-divergences, LD-DPO, WPO), mixtures, TRL's names, and their checks.

Hand-derived numbers use tests/test_losses.py's pair: pc = -1, pr = -3, rc = rr = -2, so the
log-ratios are lc = 1, lr = -1.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests_helpers import tiny_datamodule

from dpo.data.batch import Layout
from dpo.maths.logprobs import PairLogps, past_shared_length, scored_logps
from dpo.maths.losses import Loss, compute_loss, get_loss
from dpo.maths.losses.modifiers import f_divergence_scores
from dpo.models.forward import scored_logits


def pair(c, r, rc=-2.0, rr=-2.0, nc=2.0, nr=4.0):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(c), t(r), t(nc), t(nr)), PairLogps(t(rc), t(rr), t(nc), t(nr))


def nls(x):
    return math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    ("kind", "alpha", "chosen", "rejected"),
    [
        ("forward_kl", 0.5, 1 - math.exp(-1), 1 - math.exp(1)),  # f'(u) = 1 - 1/u
        ("js_divergence", 0.5, math.log(2 * math.e / (1 + math.e)), math.log(2 / (1 + math.e))),  # log(2u/(1+u))
        ("alpha_divergence", 0.5, (math.exp(-0.5) - 1) / -0.5, (math.exp(0.5) - 1) / -0.5),  # (u^(a-1) - 1)/(a-1)
        ("alpha_divergence", 1.0, 1.0, -1.0),  # the limit a -> 1 is log u
    ],
)
def test_f_divergence_dpo_is_dpo_on_the_scores(kind, alpha, chosen, rejected):
    """loss = -log s(beta (f'(u_c) - f'(u_r))) with u = e^lc, e^lr; the rewards stay beta * log-ratio."""
    policy, reference = pair(-1.0, -3.0)
    out = compute_loss("dpo", policy, reference, {"beta": 0.5, "f_divergence_type": kind,
                                                  "f_alpha_divergence_coef": alpha})  # fmt: skip
    assert out.losses.item() == pytest.approx(nls(0.5 * (chosen - rejected)), abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.5, -0.5))


def test_reverse_kl_scores_are_the_log_ratios_and_every_score_is_zero_at_the_reference():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    assert torch.equal(f_divergence_scores(x, "reverse_kl"), x)
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        assert f_divergence_scores(torch.zeros(1, dtype=torch.float64), kind).item() == pytest.approx(0, abs=1e-15)
        assert torch.all(f_divergence_scores(x, kind).diff() > 0)  # increasing: the preference keeps its sign


def test_a_mixture_is_the_weighted_sum_of_its_terms_with_the_first_terms_rewards():
    """MPO: 0.8 * -log s(0.5 * 2) + 0.2 * (-log s(0.5) - log s(0.5)) + 1.0 * (1 / 2)."""
    policy, reference = pair(-1.0, -3.0)
    params = {"terms": ["sigmoid", "bco_pair", "sft_token_mean"], "weights": [0.8, 0.2, 1.0], "beta": 0.5}
    out = compute_loss("mix", policy, reference, params)
    assert out.losses.item() == pytest.approx(0.8 * nls(1) + 0.2 * 2 * nls(0.5) + 0.5, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    loss = Loss.of("mix", params)
    assert loss.terms == (("dpo", 0.8), ("bco_pair", 0.2), ("sft_token_mean", 1.0))  # TRL's names resolved
    assert loss.needs_reference and loss.needs_pairs


def test_ld_alpha_weighs_the_tail_past_the_shared_length():
    """p = shared + alpha * tail: with tails 0.5 (chosen) and 2 (rejected) and alpha 0.25, pc = -1 - 0.75 * 0.5
    ... written out: chosen = -1 - (1 - 0.25) * (-0.5) = -0.625, rejected = -3 - 0.75 * (-2) = -1.5."""
    policy, reference = pair(-1.0, -3.0)
    policy = policy._replace(chosen_tail=torch.tensor([-0.5], dtype=torch.float64),
                             rejected_tail=torch.tensor([-2.0], dtype=torch.float64))  # fmt: skip
    reference = reference._replace(chosen_tail=torch.zeros(1, dtype=torch.float64),
                                   rejected_tail=torch.zeros(1, dtype=torch.float64))  # fmt: skip
    out = compute_loss("dpo", policy, reference, {"beta": 1.0, "ld_alpha": 0.25})
    h = (-0.625 + 2) - (-1.5 + 2)
    assert out.losses.item() == pytest.approx(nls(h), abs=1e-12)
    with pytest.raises(ValueError, match="tails"):  # a reference scored without the split
        compute_loss("dpo", policy, reference._replace(chosen_tail=None), {"beta": 1.0, "ld_alpha": 0.25})


def test_the_shared_length_split_is_the_same_in_every_layout(bpe_tokenizer, tiny_model):
    """Past the shared length min(|c|, |r|), counted in each response's own tokens: the brute force
    over each response's token list, in every layout; the tail sums (and WPO's weights) agree across
    layouts to fp32 rounding."""
    results = {}
    for layout in (Layout.separate, Layout.shared_prefix):  # padding_free: its own models (test_packing.py)
        dm = tiny_datamodule(bpe_tokenizer, layout=layout, max_rows=8)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        past = past_shared_length(batch)
        seg, pair_of = batch["score_seg"], batch["score_pair"]
        for b in range(batch["n_pairs"]):
            counts = [int(((seg == s) & (pair_of == b)).sum()) for s in (0, 1)]
            for s in (0, 1):
                flags = past[(seg == s) & (pair_of == b)].tolist()  # row-major order = the response's order
                assert flags == [i >= min(counts) for i in range(counts[s])], layout
        with torch.no_grad():
            results[layout] = scored_logps(scored_logits(tiny_model, batch), batch, tails=True, wpo=True)
    first = results[Layout.separate]
    assert bool((first.chosen_tail != 0).any() and (first.rejected_tail != 0).any())  # the batch has tails
    for logps in results.values():
        for field in ("chosen_tail", "rejected_tail", "wpo_log_weight"):
            torch.testing.assert_close(getattr(logps, field), getattr(first, field), atol=1e-4, rtol=1e-5)


def test_wpo_weights_are_the_aligned_mean_probabilities(bpe_tokenizer, tiny_model):
    """wpo_log_weight = mean over chosen tokens of (log p_t - log sum_v p_v^2) + the same over the
    rejected ones, from the full logits by brute force (fp64)."""
    model = tiny_model.double()
    dm = tiny_datamodule(bpe_tokenizer, max_rows=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        logps = scored_logps(scored_logits(model, batch), batch, wpo=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    aligned = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - torch.logsumexp(2 * logp, -1)) * mask
    per_row = aligned.sum(1) / mask.sum(1)  # rows [chosen; rejected]
    n = batch["n_pairs"]
    torch.testing.assert_close(logps.wpo_log_weight, per_row[:n] + per_row[n:], atol=1e-10, rtol=1e-10)
    assert torch.all(logps.wpo_log_weight.exp() > 0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {"beta": 0.1, "f_divergence_type": "kl"}, "f_divergence_type must be one of"),
        ("nca_pair", {"beta": 0.1, "f_divergence_type": "js_divergence"}, "log-ratio margin only"),
        ("dpo", {"beta": 0.1, "ld_alpha": 1.5}, "ld_alpha must be in"),
        ("aot", {"beta": 0.1, "label_smoothing": 0.0, "use_weighting": True}, "AOT"),
        ("sft", {"use_weighting": True}, "chosen responses only"),
        ("exo_pair", {"beta": 0.1, "label_smoothing": 0.0}, "EXO"),
        ("discopop", {"beta": 0.1, "tau": 0.0}, "tau must be > 0"),
        ("mix", {"terms": ["dpo", "dpoo"], "beta": 0.1}, "loss.terms: 'dpoo' is not a registered loss"),
        ("mix", {"terms": ["dpo", "hinge"], "weights": [1.0], "beta": 0.1}, "as many loss.weights"),
        ("mix", {"terms": ["dpo", "simpo"], "beta": 0.1}, "'simpo' needs parameter"),
        ("mix", {"terms": ["dpo"], "beta": 0.1, "tau": 0.05}, r"no parameter\(s\) \['tau'\]"),
        ("mix", {"terms": ["dpo"], "weights": [-1.0], "beta": 0.1}, "weight >= 0"),
    ],
)
def test_loss_mistakes_are_refused_by_name(name, params, message):
    with pytest.raises(ValueError, match=message):
        Loss.of(name, params)


def test_trl_names_are_aliases_of_ours_and_sft_is_not():
    assert get_loss("sigmoid") is get_loss("dpo") and get_loss("robust") is get_loss("robust_dpo")
    assert get_loss("ipo") is get_loss("ipo_length_norm")
    assert get_loss("sft") is not get_loss("sft_token_mean")  # TRL's sft is our token-mean form
    with pytest.raises(KeyError, match="sigmoid_norm"):  # the error lists every name, TRL's included
        get_loss("sigmoid_normm")


@pytest.mark.parametrize("tiled", [False, True])
def test_modifiers_under_bf16_autocast_train_near_fp32(bpe_tokenizer, tiny_model, monkeypatch, tiled):
    """trainer.precision=bf16-mixed's forward (CPU autocast), with the LM head in tiles or not: a
    mixture with WPO, LD-DPO and the alpha divergence gives a finite loss and gradients within bf16's
    rounding of fp32's (8-bit mantissa, 0.4% per product, through 2 layers and a 32-wide head: 3%
    relative holds on any CPU; measured 1e-4 on an AMD EPYC Zen 4)."""
    import dpo.maths.tiled
    from dpo.systems.base import OptimConfig
    from dpo.systems.dpo import DPOModule
    from dpo.systems.reference import FrozenCopy

    if tiled:
        monkeypatch.setattr(dpo.maths.tiled, "TILE_ELEMENTS", 4096)
    dm = tiny_datamodule(bpe_tokenizer, max_rows=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    params = {"terms": ["dpo", "sft_token_mean"], "weights": [1.0, 0.5], "beta": 0.1, "use_weighting": True,
              "ld_alpha": 0.5, "f_divergence_type": "alpha_divergence"}  # fmt: skip
    module = DPOModule(tiny_model, FrozenCopy.of(tiny_model), loss="mix", loss_params=params,
                       optim=OptimConfig({"_target_": "torch.optim.AdamW", "lr": 1e-3}))  # fmt: skip
    fp32, _ = module.shared_step(batch, "train")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, metrics = module.shared_step(batch, "train")
    bf16.backward()
    assert torch.isfinite(bf16) and all(torch.isfinite(v) for v in metrics.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    assert bf16.item() == pytest.approx(fp32.item(), rel=3e-2)
