"""GRPO and RLOO: a tiny model raises a reward on groups of its own samples; RLOO's KL penalty enters
the score before the leave-one-out baseline; config mistakes are refused before weights load; DDP on
2 CPU processes equals one process; kill -9 then the same command resumes with the same losses.
The maths (group advantages, KL estimators, aggregations) is tested by hand in tests/test_rl.py."""

from __future__ import annotations

import pytest
import torch
from test_online_dpo import assert_kill_9_resumes_the_same_losses, run_cli
from test_online_dpo import fit as fit_online
from test_ppo import Counter, IdTokenizer, frequency_reward

from conftest import FAST, compose_config
from dpo.config.settings import ConfigError
from dpo.config.validate import validate
from dpo.maths.rl import group_advantages
from dpo.models.load import ModelConfig, load_policy
from dpo.systems.base import OptimConfig
from dpo.systems.grpo import GRPOConfig, GRPOModule
from dpo.systems.reference import FrozenCopy
from dpo.systems.rloo import RLOOConfig

SCHEMAS = {"grpo": GRPOConfig, "rloo": RLOOConfig}


def tiny(kind: str, **cfg) -> GRPOModule:
    torch.manual_seed(0)
    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    policy = load_policy(ModelConfig(None, architecture=arch))
    system = SCHEMAS[kind](generation={"max_new_tokens": 8}, include_prompt=False, minibatch_size=16, **cfg)
    optim = OptimConfig(optimizer={"_target_": "torch.optim.AdamW", "lr": 3e-3})
    return GRPOModule(policy, FrozenCopy.of(policy), frequency_reward, IdTokenizer(), system, optim, max_grad_norm=1.0)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_tiny_model_raises_a_token_frequency_reward_and_the_kl_grows_from_zero(kind, tmp_path):
    module = tiny(kind, epochs=2, kl_coef=0.01)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    counter = Counter()
    trainer = fit_online(module, 20, tmp_path, counter)
    assert trainer.global_step == 20 * 2 * 4  # batches x epochs x (16 prompts x 4 samples / 16 per step)
    first, last = counter.logged[0], counter.logged[-1]
    # Random 16-token vocabulary: TARGET starts near 1/16 of the tokens.
    assert first["train/pg/reward"] < 0.2 and last["train/pg/reward"] > 0.5, (first, last)
    assert first["train/pg/kl"] == pytest.approx(0.0, abs=1e-5) and last["train/pg/kl"] > 0.1
    assert module.rollouts == 20 * 16 * 4 and module.generated_tokens <= module.rollouts * 8
    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, reference_before[key]), key


def test_rloo_penalises_the_score_by_the_kl_before_its_leave_one_out_baseline():
    """After a few random updates policy != reference: RLOO's advantages are the leave-one-out
    baseline of ``score - 0.5 x sum_t (log pi - log pi_ref)``; GRPO's (kl in the loss) of the score alone."""
    module = tiny("rloo", kl_coef=0.5)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, rows = [[2, 3, 4], [5, 6]], torch.tensor([0, 1])
    s = module.rollout(prompts, rows)
    seq_kl = (s.logps - s.ref_logps).sum(1)
    assert seq_kl.abs().max() > 1e-3
    expected = group_advantages(s.scores - 0.5 * seq_kl, 4, "leave_one_out", scale=False)
    assert torch.allclose(s.advantages, expected, atol=1e-6)
    module.cfg.kl_in, module.cfg.baseline, module.cfg.scale_rewards = "loss", "mean", True  # GRPO's choices
    g = module.rollout(prompts, rows)
    assert torch.allclose(g.advantages, group_advantages(g.scores, 4, "mean", scale=True), atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_config_mistakes_are_refused_before_any_weights_load(kind, tmp_path):
    def cfg(*overrides):
        return compose_config([*FAST, f"system={kind}", "callbacks.samples=null", *overrides], tmp_path)

    refusals = {
        ("system.samples_per_prompt=1",): "samples_per_prompt=1 must be >= 2",
        ("system.kl_estimator=k4",): "kl_estimator='k4' must be k1 | k2 | k3",
        ("system.loss_type=sum",): "loss_type='sum' must be grpo | dr_grpo | dapo",
        ("system.kl_in=value",): "kl_in='value' must be loss | reward",
        ("system.baseline=median",): "baseline='median'",
        ("system.clip_range_high=0",): "clip_range_high=0",
        ("system.minibatch_size=3",): "minibatch_size=3 must divide",
        ("reference=none",): "needs a reference",
        ("reference=precomputed",): "precomputed for the data's pairs only",
        ("trainer=fsdp_cpu",): "not a sharded",
        ("system.reward={path: x}",): "system.reward must be null",
    }
    for overrides, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            validate(cfg(*overrides))
    validate(cfg("reference=none", "system.kl_coef=0"))  # no KL term: no reference needed


TINY_PG = ["system.minibatch_size=32", "reward=tfidf"]  # 8 prompts x 4 samples: one step per batch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_under_ddp_on_two_cpu_processes_equals_one_process(kind, tmp_path):
    """Global batches of 8 prompts x 4 samples, each rank's whole batch one step (minibatch_size = the
    rank's samples: 32 on one process, 16 on each of two): the per-step losses, rewards and KLs agree
    to fp32 rounding."""
    one = run_cli(tmp_path / "one", "trainer.max_steps=3", *TINY_PG, system=kind)
    two = run_cli(tmp_path / "two", "trainer.max_steps=3", *TINY_PG[1:], "system.minibatch_size=16", "trainer=ddp_cpu",
                  "data.micro_batch_size=4", system=kind)  # fmt: skip
    pick = lambda rows, key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    for key in ("train/loss", "train/pg/reward", "train/pg/kl", "train/pg/policy_loss"):
        assert len(pick(one, key)) == 3 and pick(two, key) == pytest.approx(pick(one, key), abs=1e-5), key


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_the_same_losses(tmp_path):
    """GRPO, 10 steps, checkpoints every 3: killed after step 3's checkpoint, the same command resumes
    there and every step's loss equals an uninterrupted run's."""
    over = [*TINY_PG, "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=3"]
    assert_kill_9_resumes_the_same_losses(tmp_path, over, system="grpo")
