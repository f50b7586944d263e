"""Every TRL 1.16 DPO ``loss_type`` (and mixtures, f-divergences, LD-DPO, WPO) against TRL's own code.

TRL has no standalone loss function: each ``loss_type`` is computed inside
``DPOTrainer._compute_loss``. So that method runs here, unbound, on a stand-in trainer holding just
the attributes it reads (its config values, an accelerator whose gathers are the identity), on the
same tiny policy and reference and the same batch our ``DPOModule.shared_step`` trains on.

Two comparisons. The exact one: both models in float64, and TRL's fused LM head replaced by a stub
that returns the model's own per-token log-probs (and ``log sum_v p_v^2`` for WPO) in float64, so
TRL's loss code (its masks for LD-DPO, its WPO weights, mixtures, f-divergences) and ours meet on
the same numbers: equal to 1e-9 (fp64 rounding of ~60-token sums is ~1e-13; 1e-9 leaves room on any
CPU). The end-to-end one: fp32 models with TRL's real fused head (``add_fused_lm_head``), equal to
fp32 rounding (see its test). Rewards are compared as TRL logs them (batch means of
``beta * log-ratio``); where our loss defines its reward differently the test says so.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from tests_helpers import tiny_data_config

from dpo.data.batch import Layout
from dpo.data.datamodule import PreferenceDataModule
from dpo.data.sources import SourceSpec, bundled_path
from dpo.maths.losses import compute_loss
from dpo.models.forward import score_pairs
from dpo.systems.base import OptimConfig
from dpo.systems.dpo import DPOModule
from dpo.systems.reference import FrozenCopy

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

OPTIM = OptimConfig({"_target_": "torch.optim.AdamW", "lr": 1e-3})
TOL = 1e-9


@pytest.fixture(scope="module")
def models_and_batch(bpe_tokenizer):
    """A tiny policy, a different tiny reference (the policy plus noise), fp64, eval mode, and a batch
    of 8 bundled pairs in the separate layout (TRL's: rows [chosen; rejected])."""
    from conftest import TINY_ARCH
    from dpo.models.load import ModelConfig, load_policy

    torch.manual_seed(0)
    policy = load_policy(ModelConfig(None, architecture=TINY_ARCH), tokenizer=bpe_tokenizer).double().eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = bundled_path("reviews_val.jsonl")
    source = SourceSpec("fields", {"train": path, "val": path}, None)
    dm = PreferenceDataModule(bpe_tokenizer, tiny_data_config(source, batch_size=8, micro_batch_size=8), pairs=True,
                              layout=Layout.separate)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return policy, reference, batch


class LogpsHead(torch.nn.Module):
    """A stand-in for a model under TRL's fused LM head: ``model(..., labels, fused_lm_head=True)``
    gives per-token log-probs of the labels (shifted, 0 where ignored) and ``log sum_v p_v^2``, from
    the wrapped model's full logits in its own dtype (float64 here)."""

    is_gradient_checkpointing = False

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, fused_lm_head=True, use_cache=False):
        logp = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].log_softmax(-1)
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=torch.logsumexp(2 * logp, -1) * mask,
                               entropy=zeros, mean_logits=zeros, is_top1=mask & False)  # fmt: skip


def trl_loss(policy, reference, batch, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
             use_weighting=False, fused=False):  # fmt: skip
    """TRL 1.16's ``DPOTrainer._compute_loss`` on ``batch``: (loss, mean chosen reward, mean rejected reward).
    ``fused``: TRL's own fused LM head on copies of the models; else :class:`LogpsHead`."""
    if fused:
        policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
        fields = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if use_weighting else ())
        add_fused_lm_head(policy, outputs=fields)
        add_fused_lm_head(reference)
    else:
        policy, reference = LogpsHead(policy).eval(), LogpsHead(reference).eval()
    gather = lambda x: x  # noqa: E731  (one process)
    trainer = SimpleNamespace(
        model=policy, ref_model=reference, aux_loss_enabled=False, precompute_ref_logps=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=gather,
                                    autocast=contextlib.nullcontext),
        loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type), beta=beta,
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha, use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}  # fmt: skip
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
    metrics = trainer._metrics["eval"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def our_loss(policy, reference, batch, name, params):
    """``DPOModule.shared_step``: (loss, mean chosen reward, mean rejected reward)."""
    module = DPOModule(policy, FrozenCopy(copy.deepcopy(reference)), loss=name, loss_params=params, optim=OPTIM)
    with torch.no_grad():
        loss, metrics = module.shared_step(batch, "train")
    rewards = [metrics.get(f"train/rewards/{k}") for k in ("chosen", "rejected")]
    return loss.item(), *(None if r is None else r.item() for r in rewards)


# (our loss name, our params, TRL's DPOConfig values): each of TRL 1.16's 15 loss types, then mixtures and modifiers.
CASES = {
    "sigmoid": ("dpo", {"beta": 0.1}, {"loss_type": ["sigmoid"]}),
    "sigmoid by its TRL name": ("sigmoid", {"beta": 0.1}, {"loss_type": ["sigmoid"]}),
    "hinge": ("hinge", {"beta": 0.1}, {"loss_type": ["hinge"]}),
    "ipo": ("ipo", {"beta": 0.1}, {"loss_type": ["ipo"]}),
    "exo_pair": ("exo_pair", {"beta": 0.1, "label_smoothing": 1e-3},
                 {"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    "nca_pair": ("nca_pair", {"beta": 0.1}, {"loss_type": ["nca_pair"]}),
    "robust": ("robust", {"beta": 0.1, "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "bco_pair": ("bco_pair", {"beta": 0.1}, {"loss_type": ["bco_pair"]}),
    "sppo_hard": ("sppo_hard", {"beta": 0.1}, {"loss_type": ["sppo_hard"]}),
    "aot": ("aot", {"beta": 0.1, "label_smoothing": 0.1}, {"loss_type": ["aot"], "label_smoothing": 0.1}),
    "aot_unpaired": ("aot_unpaired", {"beta": 0.1, "label_smoothing": 0.1},
                     {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1}),
    "apo_zero": ("apo_zero", {"beta": 0.1}, {"loss_type": ["apo_zero"]}),
    "apo_down": ("apo_down", {"beta": 0.1}, {"loss_type": ["apo_down"]}),
    "discopop": ("discopop", {"beta": 0.1, "tau": 0.05}, {"loss_type": ["discopop"], "discopop_tau": 0.05}),
    "sft": ("sft_token_mean", {}, {"loss_type": ["sft"]}),
    "sigmoid_norm": ("sigmoid_norm", {"beta": 0.1}, {"loss_type": ["sigmoid_norm"]}),
    "MPO mixture": ("mix", {"terms": ["sigmoid", "bco_pair", "sft_token_mean"], "weights": [0.8, 0.2, 1.0],
                            "beta": 0.1},
                    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    "forward_kl": ("dpo", {"beta": 0.1, "f_divergence_type": "forward_kl"},
                   {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    "js_divergence": ("dpo", {"beta": 0.1, "f_divergence_type": "js_divergence"},
                      {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    "f-divergence on ipo, hinge, exo_pair, discopop, sft": (
        "mix", {"terms": ["hinge", "ipo", "exo_pair", "discopop", "sft_token_mean"],
                "weights": [0.5, 1.0, 0.25, 0.5, 0.1], "beta": 0.1, "label_smoothing": 1e-3, "tau": 0.05,
                "f_divergence_type": "js_divergence"},
        {"loss_type": ["hinge", "ipo", "exo_pair", "discopop", "sft"], "loss_weights": [0.5, 1.0, 0.25, 0.5, 0.1],
         "label_smoothing": 1e-3, "f_divergence_type": "js_divergence"}),
    "ld_alpha": ("dpo", {"beta": 0.1, "ld_alpha": 0.3}, {"loss_type": ["sigmoid"], "ld_alpha": 0.3}),
    "ld_alpha 0 with ipo": ("ipo", {"beta": 0.1, "ld_alpha": 0.0}, {"loss_type": ["ipo"], "ld_alpha": 0.0}),
    "use_weighting (WPO)": ("dpo", {"beta": 0.1, "use_weighting": True},
                            {"loss_type": ["sigmoid"], "use_weighting": True}),
    "WPO, LD-DPO and f-divergence on a mixture": (
        "mix", {"terms": ["sigmoid", "hinge"], "weights": [1.0, 0.5], "beta": 0.1, "use_weighting": True,
                "ld_alpha": 0.5, "f_divergence_type": "forward_kl"},
        {"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, 0.5], "use_weighting": True, "ld_alpha": 0.5,
         "f_divergence_type": "forward_kl"}),
}  # fmt: skip
FP32_ONLY = {  # TRL 1.16's alpha divergence has no float64 entry in its clamp table (KeyError): fp32, fused
    "alpha_divergence": ("dpo", {"beta": 0.1, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
                         {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence",
                          "f_alpha_divergence_coef": 0.3}),
}  # fmt: skip
EXO_EPS_FP32 = {"exo_pair", "f-divergence on ipo, hinge, exo_pair, discopop, sft"}
"""TRL makes EXO's eps a float32 tensor (``torch.tensor(label_smoothing)``), so its log(eps) and
log(1 - eps) carry fp32 rounding (6e-8 relative): these cases hold to 1e-7 relative, not 1e-9."""


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_rewards_equal_trls(case, models_and_batch):
    policy, reference, batch = models_and_batch
    name, params, trl_args = CASES[case]
    ours = our_loss(policy, reference, batch, name, params)
    theirs = trl_loss(policy, reference, batch, **trl_args)
    tol = 1e-7 if case in EXO_EPS_FP32 else TOL
    assert abs(ours[0] - theirs[0]) <= tol * max(1.0, abs(theirs[0])), (ours, theirs)
    if name in ("sft_token_mean", "ipo"):
        return  # rewards: their own tests below
    assert ours[1:] == pytest.approx(theirs[1:], abs=TOL, rel=TOL)


def test_ipo_and_sft_rewards_are_defined_as_documented(models_and_batch):
    """Our ``ipo`` (ipo_length_norm) logs the length-normalised implicit reward its loss uses,
    beta * lc / |c|; TRL logs beta * lc. Our token-mean SFT logs no reward (it has none)."""
    policy, reference, batch = models_and_batch
    ours = DPOModule(policy, FrozenCopy(copy.deepcopy(reference)), loss="ipo", loss_params={"beta": 0.1}, optim=OPTIM)
    with torch.no_grad():
        _, metrics = ours.shared_step(batch, "train")
        dpo = DPOModule(policy, FrozenCopy(copy.deepcopy(reference)), loss="dpo", loss_params={"beta": 0.1},
                        optim=OPTIM)  # fmt: skip
        policy_logps, _ = score_pairs(policy, batch)
        _, dpo_metrics = dpo.shared_step(batch, "train")
    per_token = (dpo.loss(policy_logps, dpo.reference.score(batch, policy)).chosen_rewards / policy_logps.chosen_tokens)
    assert metrics["train/rewards/chosen"].item() == pytest.approx(per_token.mean().item(), abs=1e-12)
    theirs = trl_loss(policy, reference, batch, ["ipo"])
    assert dpo_metrics["train/rewards/chosen"].item() == pytest.approx(theirs[1], abs=TOL)
    assert our_loss(policy, reference, batch, "sft_token_mean", {})[1:] == (None, None)


@pytest.mark.parametrize("case", ["sigmoid", "use_weighting (WPO)", "ld_alpha", "MPO mixture", "alpha_divergence"])
def test_fp32_losses_equal_trls_with_its_fused_head(case, models_and_batch):
    """End to end in fp32 with TRL's own fused LM head (its chunked log-probs and ``log sum p^2``
    kernel) against our LM-head path: the same to fp32 rounding. Each token's log-prob carries
    ~6e-8 relative rounding on both sides (different GEMM shapes and sum orders), so the ~60-token
    sums differ by up to ~1e-5 and a loss by ~1e-6; tolerance 5e-6 on the loss and 2e-5 on the
    rewards (beta * summed log-ratios), measured 6e-7 and 1.7e-6 here (AMD EPYC Zen 4)."""
    policy, reference, batch = models_and_batch
    policy, reference = copy.deepcopy(policy).float(), copy.deepcopy(reference).float()
    name, params, trl_args = (CASES | FP32_ONLY)[case]
    ours = our_loss(policy, reference, batch, name, params)
    theirs = trl_loss(policy, reference, batch, **trl_args, fused=True)
    assert ours[0] == pytest.approx(theirs[0], abs=5e-6)
    assert ours[1:] == pytest.approx(theirs[1:], abs=2e-5)


def test_wpo_with_the_sft_term_is_defined_here_and_raises_in_trl(models_and_batch):
    """TRL 1.16 multiplies its ``sft`` term (a scalar ``expand``ed to the batch) by the WPO weights in
    place, which raises; ours weighs the token-mean SFT's per-pair values like any other term:
    (sigmoid + 0.5 * sft) * w, pair by pair."""
    policy, reference, batch = models_and_batch
    with pytest.raises(RuntimeError, match="single memory location"):
        trl_loss(policy, reference, batch, ["sigmoid", "sft"], [1.0, 0.5], use_weighting=True)
    params = {"terms": ["dpo", "sft_token_mean"], "weights": [1.0, 0.5], "beta": 0.1}
    weighted = our_loss(policy, reference, batch, "mix", params | {"use_weighting": True})[0]
    with torch.no_grad():
        logps, _ = score_pairs(policy, batch, wpo=True)
        ref, _ = score_pairs(reference, batch)
    per_pair = 0.5 * (-logps.chosen * logps.chosen.shape[0] / logps.chosen_tokens.sum())
    margin = (logps.chosen - ref.chosen) - (logps.rejected - ref.rejected)
    per_pair = per_pair - torch.nn.functional.logsigmoid(0.1 * margin)
    assert weighted == pytest.approx((per_pair * logps.wpo_log_weight.exp()).mean().item(), abs=1e-12)


def test_cpo_and_orpo_equal_trls_experimental_trainers(models_and_batch):
    """TRL 1.16 keeps CPO and ORPO in ``trl.experimental``: their preference terms are methods
    (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``, called unbound here on the batch's fp64
    log-probs) and their NLL the cross-entropy over the chosen tokens (a token mean, computed here from
    the full logits). Our losses equal theirs: CPO to 1e-12; ORPO to 1e-6 (its method upcasts to fp32,
    which from fp64 is a rounding)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    policy, _, batch = models_and_batch
    with torch.no_grad():
        logps, _ = score_pairs(policy, batch)
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = batch["n_pairs"]
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]),
                                            batch["labels"][:n, 1:].reshape(-1), ignore_index=-100)  # fmt: skip
    stub = SimpleNamespace(beta=0.1, alpha=0.0, loss_type="sigmoid", label_smoothing=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    theirs = CPOTrainer.cpo_loss(stub, logps.chosen, logps.rejected)
    ours = compute_loss("cpo", logps, None, {"beta": 0.1, "alpha": 1.0})
    assert ours.losses.mean().item() == pytest.approx((theirs[0].mean() + 1.0 * nll).item(), abs=1e-12)
    assert torch.equal(ours.chosen_rewards, theirs[1]) and torch.equal(ours.rejected_rewards, theirs[2])
    theirs = ORPOTrainer.odds_ratio_loss(stub, logps.chosen_mean, logps.rejected_mean)
    ours = compute_loss("orpo", logps, None, {"beta": 0.1})
    assert ours.losses.mean().item() == pytest.approx((nll - theirs[0].mean()).item(), abs=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, theirs[1].double(), atol=1e-7, rtol=1e-6)
