"""The PPO system: it raises a simple reward on a tiny model while the KL to the untouched reference
grows from 0; runs from the CLI (resume, the evaluation callback's clock); under DDP its metrics are
global means of sharded rollouts; bad PPO configs fail before any weights load."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from conftest import FAST, compose_config
from dpo.config.settings import ConfigError
from dpo.config.validate import validate
from dpo.data.collate import collate_prompts
from dpo.data.tokenize import TokenizedPair
from dpo.maths.rl import response_positions
from dpo.models.load import ModelConfig, load_policy
from dpo.systems.base import OptimConfig
from dpo.systems.ppo import PPOConfig, PPOModule
from dpo.systems.reference import FrozenCopy

TARGET = 3  # the token whose frequency the test reward pays for


class Counter(pl.Callback):
    """Records the logged (all-rank mean) PPO metrics after every batch."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def frequency_reward(texts: list[str]) -> list[float]:
    """Share of a completion's tokens that are TARGET (texts are the completion ids, space-separated)."""
    return [sum(t == str(TARGET) for t in s.split()) / max(1, len(s.split())) for s in texts]


class IdTokenizer:
    """Writes ids as space-separated numbers; pads with 1, has no EOS (the tiny model never stops early)."""

    pad_token_id, eos_token_id = 1, None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


def tiny_ppo(kl_coef: float = 0.02, **cfg) -> PPOModule:
    torch.manual_seed(0)
    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    policy = load_policy(ModelConfig(None, architecture=arch))
    optim = OptimConfig(optimizer={"_target_": "torch.optim.AdamW", "lr": 3e-3})
    ppo = PPOConfig(generation={"max_new_tokens": 8, "temperature": 1.0}, ppo_epochs=2, minibatch_size=8,
                    kl_coef=kl_coef, include_prompt=False, **cfg)  # fmt: skip
    return PPOModule(policy, FrozenCopy.of(policy), frequency_reward, IdTokenizer(), cfg=ppo, optim=optim,
                     max_grad_norm=1.0)  # fmt: skip


def prompt_loader(n_batches: int, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    items = [TokenizedPair(torch.randint(2, 16, (3,), generator=g).tolist(), [1], None, index=i)
             for i in range(n_batches * batch)]  # fmt: skip
    return DataLoader(items, batch_size=batch, collate_fn=collate_prompts)


def test_response_positions_point_at_each_tokens_predictor():
    """Prompt of 3 and response of 2: tokens at 3, 4 are predicted from 2, 3; padding points at 0."""
    pos, mask = response_positions([3, 1], [2, 1])
    assert pos.tolist() == [[2, 3], [0, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_ppo_raises_a_token_frequency_reward_and_the_kl_grows_from_zero(tmp_path):
    module = tiny_ppo()
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    counter = Counter()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[counter],
                         default_root_dir=tmp_path, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, train_dataloaders=prompt_loader(20))
    assert trainer.global_step == 20 * 2 * 2  # batches x ppo_epochs x minibatches: optimizer steps
    first, last = counter.logged[0], counter.logged[-1]
    # Random 16-token vocabulary: TARGET starts near 1/16 of the tokens.
    assert first["train/ppo/reward"] < 0.2 and last["train/ppo/reward"] > 0.5, (first, last)
    assert first["train/ppo/kl"] == pytest.approx(0.0, abs=1e-5) and last["train/ppo/kl"] > 0.1
    assert module.rollouts == 320 and 320 <= module.generated_tokens <= 320 * 8  # generation may end at EOS
    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, reference_before[key]), key
    for key in ("entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance", "reward_penalized"):
        assert f"train/ppo/{key}" in last


def test_ppo_through_the_head_in_tiles_follows_the_full_logits(tmp_path, monkeypatch):
    """Tiles of 48 logits (3 tokens of this 16-token vocabulary; dpo.maths.tiled): the same rollouts
    and updates as with the full logits, to fp32 rounding (sums over a tile's tokens in another order)."""

    def run() -> list[dict[str, float]]:
        counter = Counter()
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[counter],
                             default_root_dir=tmp_path)  # fmt: skip
        torch.manual_seed(0)
        trainer.fit(tiny_ppo(), train_dataloaders=prompt_loader(2))
        return counter.logged

    full = run()
    monkeypatch.setattr("dpo.maths.tiled.TILE_ELEMENTS", 48)
    tiled = run()
    assert len(full) == len(tiled) == 2
    for a, b in zip(full, tiled, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("train/tokens_per_s", "train/peak_memory_mb"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_the_evaluation_clock_fires_when_a_batch_steps_past_a_multiple(tmp_path):
    """Each batch makes 4 optimizer steps; every_n_steps=6 fires after steps 8 (past 6) and 12."""
    from dpo.systems.base import optimizer_step_ended

    fired = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if optimizer_step_ended(trainer, batch_idx, 6):
                fired.append(trainer.global_step)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(tiny_ppo(), train_dataloaders=prompt_loader(4))
    assert fired == [8, 12]


def test_ppo_config_checks_fail_before_any_weights_load(tmp_path):
    def cfg(*overrides):
        return compose_config([*FAST, "system=ppo", "callbacks.samples=null", *overrides], tmp_path)

    with pytest.raises(ConfigError, match="reference=copy or lora.*precomputed"):
        validate(cfg("reference=precomputed"))
    with pytest.raises(ConfigError, match="minibatch_size=5 must divide"):
        validate(cfg("system.minibatch_size=5"))
    with pytest.raises(ConfigError, match="system=ppo steps its optimizer itself, one batch at a time"):
        validate(cfg("data.batch_size=16", "data.micro_batch_size=8", "system.minibatch_size=4"))
    with pytest.raises(ConfigError, match="not a sharded"):
        validate(cfg("trainer=fsdp_cpu"))
    with pytest.raises(ConfigError, match="callbacks.samples .* samples from a language model"):
        validate(compose_config([*FAST, "system=reward_model"], tmp_path))


@pytest.mark.parametrize("mode", ["scale", "standardize"])
def test_normalised_rewards_are_what_the_advantages_see(mode, monkeypatch):
    """system.reward_norm: the shaped rewards get the score divided by the running std (and centred
    by the running mean); the logged reward and Rollout.scores stay raw; the statistics are
    checkpointed so a resumed run normalises as the uninterrupted one would."""
    import dpo.systems.ppo as ppo_module

    seen: list[Tensor] = []
    original = ppo_module.shaped_rewards

    def spy(scores, *args):
        seen.append(scores.clone())
        return original(scores, *args)

    monkeypatch.setattr(ppo_module, "shaped_rewards", spy)
    module = tiny_ppo(reward_norm=mode)
    prompts = [[2, 3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13]] * 2
    first, _ = module.rollout(prompts)
    second, _ = module.rollout(prompts)
    raw = torch.cat([first.scores, second.scores]).double()
    mean, std = raw.mean().float(), raw.std(unbiased=False).float()
    want = second.scores - mean if mode == "standardize" else second.scores
    torch.testing.assert_close(seen[1], want / std, rtol=1e-5, atol=1e-6)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    resumed = tiny_ppo(reward_norm=mode)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.norm.state_dict() == module.norm.state_dict() and resumed.norm.count == 16


def test_ppo_and_reward_model_settings_out_of_range_are_refused_together_by_key(tmp_path):
    """Issue 23: clip_range, vf_coef or clip_range_value with the wrong sign trained to the end, and
    trainer.max_steps=1 silently trained a whole PPO iteration (4 optimizer steps here)."""

    def cfg(*overrides):
        return compose_config([*FAST, "system=ppo", "callbacks.samples=null", "system.minibatch_size=2", *overrides],
                              tmp_path)  # fmt: skip

    with pytest.raises(ConfigError) as error:
        validate(cfg("system.clip_range=-1", "system.vf_coef=-0.1", "system.clip_range_value=0", "system.lam=2",
                     "system.generation.temperature=-1", "system.reward_norm=zscore"))  # fmt: skip
    for part in ("system.clip_range=-1.0 must be > 0", "system.vf_coef=-0.1 must be >= 0",
                 "system.reward_norm='zscore' must be none | scale | standardize",
                 "system.clip_range_value=0.0 must be > 0", "system.lam=2.0 must be in [0, 1]", "temperature >= 0"):
        assert part in str(error.value)
    with pytest.raises(ConfigError, match=r"system=ppo makes 4 optimizer steps per batch; trainer.max_steps=1 would"):
        validate(cfg("trainer.max_steps=1"))
    validate(cfg("trainer.max_steps=8"))
    with pytest.raises(ConfigError, match=r"system.center_weight=-1.0 must be >= 0"):
        validate(compose_config([*FAST, "system=reward_model", "callbacks.samples=null", "system.center_weight=-1"],
                                tmp_path))  # fmt: skip


TINY_PPO = [
    "experiment=tiny", "system=ppo", "model.architecture.n_layer=1", "model.architecture.n_embd=32",
    "model.architecture.n_head=2", "model.tokenizer.bpe_vocab_size=300", "data.max_length=64",
    "data.max_prompt_length=32", "data.source.max_rows=97", "logger=csv", "trainer.log_every_n_steps=1",
    "system.generation.max_new_tokens=8", "system.ppo_epochs=1", "system.minibatch_size=4",
    "callbacks.samples=null", "++trainer.limit_val_batches=0",
]  # fmt: skip


def run_cli(out: Path, *overrides: str) -> list[dict[str, str]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DPO_CACHE_DIR=str(out.parent / "cache"),
               PYTHONPATH=str(Path(__file__).parent))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "dpo.commands.train", f"hydra.run.dir={out}", *TINY_PPO, *overrides],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return list(csv.DictReader((out / "csv" / "metrics.csv").open()))


@pytest.mark.slow
def test_ppo_under_ddp_logs_global_means_of_sharded_rollouts(tmp_path):
    """2 CPU processes, 4 prompts each: every logged metric is the mean of the ranks' own values,
    and the ranks' prompts are disjoint halves of each global batch of 8."""
    out = tmp_path / "ddp"
    record = ["+callbacks.ranks._target_=tests_helpers.RecordPPOMetrics", f"+callbacks.ranks.out={out / 'ranks'}"]
    rows = run_cli(
        out, "trainer=ddp_cpu", "data.batch_size=8", "data.micro_batch_size=4", "trainer.max_steps=3", *record
    )
    ranks = [json.loads(line) for r in (0, 1) for line in (out / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
    by_step = {}
    for rec in ranks:
        by_step.setdefault(rec["batch"], []).append(rec)
    logged = [r for r in rows if r.get("train/ppo/reward")]
    assert len(by_step) == len(logged) == 3
    for (_, recs), row in zip(sorted(by_step.items()), logged, strict=True):
        assert len(recs) == 2
        a, b = recs
        assert not set(a["rows"]) & set(b["rows"]) and len(a["rows"]) == len(b["rows"]) == 4
        for key in ("train/ppo/reward", "train/ppo/kl", "train/loss", "train/ppo/entropy"):
            assert float(row[key]) == pytest.approx((a["local"][key] + b["local"][key]) / 2, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_ppo_cli_run_evaluates_on_the_optimizer_step_clock_and_resumes(tmp_path):
    """experiment=tiny system=ppo: 3 batches x 2 optimizer steps; the evaluation callback (every 4
    steps) writes points at steps 0, 4 and 6; run.json counts the rollout tokens; a run resumed from
    the step-4 checkpoint (policy, value head, optimizer, KL coefficient) trains on to step 6."""
    out = tmp_path / "run"
    over = ["callbacks=reward_eval", "callbacks.samples=null", "callbacks.reward_eval.every_n_steps=4",
            "callbacks.reward_eval.n_prompts=4", "callbacks.reward_eval.generation.max_new_tokens=8",
            "data.batch_size=8", "data.micro_batch_size=8", "trainer.max_steps=6",
            "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1"]  # fmt: skip
    run_cli(out, *over)
    evals = [json.loads(line) for line in (out / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 4, 6]
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "finished" and 0 < state["generated_tokens"] <= 3 * 8 * 8 and state["seconds"] > 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "hf") is not None  # the export is the policy alone
    ckpt = torch.load(out / "checkpoints" / "step000004.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4 and "value_head.weight" in ckpt["state_dict"]
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])  # never the reference
    resumed = tmp_path / "resumed"
    rows = run_cli(resumed, *over, f"ckpt_path={out / 'checkpoints' / 'step000004.ckpt'}")
    steps = [int(r["step"]) for r in rows if r.get("train/ppo/reward")]
    assert steps and min(steps) >= 4 and json.loads((resumed / "run.json").read_text())["status"] == "finished"
