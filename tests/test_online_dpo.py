"""Online and iterative DPO: the pair choice and the judge's round robin by hand; samples seeded per
(step, row, sample); a tiny model raises a reward on pairs of its own samples; rounds move the
reference to the policy and sample from it; a model judges itself; config mistakes are refused
before weights load; DDP on 2 CPU processes equals one process; kill -9 then the same command
resumes with the same losses."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_ppo import Counter, IdTokenizer, frequency_reward, prompt_loader

from conftest import FAST, compose_config
from dpo.config.settings import ConfigError
from dpo.config.validate import validate
from dpo.judges.base import Verdict
from dpo.judges.labels import reward_labels
from dpo.judges.tournament import round_robin
from dpo.maths.pairs import preference_pairs
from dpo.models.load import ModelConfig, load_policy
from dpo.models.sampling import GenerationConfig, draw_seed, generate, row_uniforms
from dpo.runtime.checkpoint import LAST, checkpoint_tensors, find_last
from dpo.systems.base import OptimConfig
from dpo.systems.online_dpo import OnlineDPOConfig, OnlineDPOModule
from dpo.systems.reference import FrozenCopy

TESTS = Path(__file__).parent


# --- the pairs and the round robin, by hand ---------------------------------------------------


def test_best_worst_pairs_the_first_best_with_the_last_worst_and_never_a_tie():
    """scores [1, 3, 0, 3, 0]: best = index 1 (first of the two 3s), worst = index 4 (last of the 0s)."""
    assert preference_pairs([1, 3, 0, 3, 0], "best_worst") == [(1, 4)]
    assert preference_pairs([2, 2, 2], "best_worst") == []  # all tied: no pair
    assert preference_pairs([0.5, 0.2], "best_worst", min_margin=0.3) == [(0, 1)]  # gap 0.3 >= 0.3
    assert preference_pairs([0.5, 0.25], "best_worst", min_margin=0.3) == []  # gap 0.25 < 0.3


def test_all_pairs_are_every_gap_above_the_margin_widest_first():
    """scores [0, 2, 1]: gaps (1,0)=2, (1,2)=1, (2,0)=1; ties of gap by index: (1,2) before (2,0)."""
    assert preference_pairs([0, 2, 1], "all") == [(1, 0), (1, 2), (2, 0)]
    assert preference_pairs([0, 2, 1], "all", max_pairs=2) == [(1, 0), (1, 2)]
    assert preference_pairs([0, 2, 1], "all", min_margin=1.5) == [(1, 0)]
    scores = torch.rand(6, generator=torch.Generator().manual_seed(0)).tolist()
    brute = {(i, j) for i in range(6) for j in range(6) if scores[i] - scores[j] >= 0.2 and scores[i] > scores[j]}
    assert set(preference_pairs(scores, "all", min_margin=0.2)) == brute
    with pytest.raises(ValueError, match="min_margin must be >= 0"):
        preference_pairs([0, 1], "all", min_margin=-1)


class ScriptedJudge:
    """Prefers the longer text; ``A`` on equal lengths of 'tie' texts; unreadable for 'x'."""

    def __init__(self) -> None:
        self.asked = []

    def judge(self, comparisons):
        self.asked += comparisons
        out = []
        for c in comparisons:
            if "x" in (c.a, c.b):
                out.append(Verdict(None, "?"))
            elif len(c.a) == len(c.b):
                out.append(Verdict("tie", "="))
            else:
                out.append(Verdict("A" if len(c.a) > len(c.b) else "B", ""))
        return out


def test_round_robin_scores_are_wins_with_half_a_win_per_tie_in_both_orders():
    """Responses 'aaa', 'a', 'bb', 'cc': 'aaa' beats all 3 (3 wins); 'bb' and 'cc' beat 'a' and tie
    each other (1.5); 'a' loses all (0). Both orders: each comparison twice, every score doubled."""
    judge = ScriptedJudge()
    scores = round_robin(judge, ["p"], [["aaa", "a", "bb", "cc"]], "both", seeds=[0])
    assert scores == [[6.0, 0.0, 3.0, 3.0]] and len(judge.asked) == 12
    one = round_robin(ScriptedJudge(), ["p", "q"], [["aaa", "a"], ["x", "b"]], "random", seeds=[0, 1])
    assert one == [[1.0, 0.0], [0.0, 0.0]]  # the unreadable verdict counts for neither
    # a judge that always answers A: one random order per comparison, the coin seeded per prompt, so a
    # prompt's scores are the same beside other prompts or alone; both orders tie everything
    biased = type("Biased", (), {"judge": lambda self, cs: [Verdict("A", "") for _ in cs]})()
    texts = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    beside = round_robin(biased, ["p", "q"], texts, "random", seeds=[7, 8])
    assert round_robin(biased, ["q"], texts[1:], "random", seeds=[8]) == beside[1:] and sum(beside[1]) == 6
    assert round_robin(biased, ["p"], texts[:1], "both", seeds=[7]) == [[3.0, 3.0, 3.0, 3.0]]
    with pytest.raises(ValueError, match="judge.orders"):
        round_robin(judge, ["p"], [["a", "b"]], "first", seeds=[0])


def test_a_completion_depends_on_its_own_draws_alone():
    """With per-row uniforms, prompt b's completion is the same sampled beside prompt a or alone."""
    torch.manual_seed(0)
    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 16}
    model = load_policy(ModelConfig(None, architecture=arch))
    gen = GenerationConfig(max_new_tokens=6)
    u = row_uniforms([draw_seed(0, 0, 5, 0), draw_seed(0, 0, 9, 0)], 6)
    both = generate(model, [[2, 3, 4], [5, 6]], gen, pad_id=1, eos_id=None, uniforms=u)
    alone = generate(model, [[5, 6]], gen, pad_id=1, eos_id=None, uniforms=u[1:])
    torch.manual_seed(123)  # the global RNG plays no part
    again = generate(model, [[5, 6]], gen, pad_id=1, eos_id=None, uniforms=u[1:])
    assert both[1] == alone[0] == again[0] and len(alone[0]) == 6
    assert draw_seed(0, 0, 5, 0) != draw_seed(0, 0, 5, 1) and draw_seed(1, 2) == draw_seed(1, 2)


# --- the system on a tiny model ---------------------------------------------------------------


def tiny_online(**cfg) -> OnlineDPOModule:
    torch.manual_seed(0)
    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    policy = load_policy(ModelConfig(None, architecture=arch))
    round_steps = cfg.pop("round_steps", 0)
    online = OnlineDPOConfig(generation={"max_new_tokens": 8}, samples_per_prompt=4, include_prompt=False, **cfg)
    return OnlineDPOModule(
        policy, FrozenCopy.of(policy, sync_every=round_steps), reward_labels(frequency_reward, False), IdTokenizer(),
        online, "dpo", {"beta": 0.1}, OptimConfig(optimizer={"_target_": "torch.optim.AdamW", "lr": 3e-3}),
        round_steps=round_steps, max_grad_norm=1.0,
    )  # fmt: skip


def fit(module: OnlineDPOModule, batches: int, tmp_path: Path, *callbacks: pl.Callback) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=tmp_path, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, train_dataloaders=prompt_loader(batches))
    return trainer


def test_online_dpo_raises_a_token_frequency_reward_on_pairs_of_its_own_samples(tmp_path):
    module = tiny_online(epochs=2)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    counter = Counter()
    trainer = fit(module, 20, tmp_path, counter)
    assert trainer.global_step == 20 * 2  # batches x epochs
    first, last = counter.logged[0], counter.logged[-1]
    # Random 16-token vocabulary: TARGET starts near 1/16 of the tokens; best-vs-worst pairs push it up.
    assert first["train/online/reward"] < 0.2 and last["train/online/reward"] > 0.5, (first, last)
    assert last["train/online/reward_chosen"] >= last["train/online/reward_rejected"]
    assert module.rollouts == 20 * 16 * 4 and module.generated_tokens <= module.rollouts * 8
    for key, value in module.reference.state_dict().items():  # online DPO: the reference stays put
        assert torch.equal(value, reference_before[key]), key


def test_rounds_sample_from_the_round_start_policy_which_becomes_the_reference(tmp_path):
    """2 rounds of 3 batches x 1 step: within a round the reference (the sampler) is fixed; after step 3
    it equals the policy of that moment; the policy kept moving."""
    module = tiny_online(round_steps=3)
    assert module.sampler() is module.reference.model
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            models = (pl_module.reference.model, pl_module.policy)
            seen.append((trainer.global_step, *(copy.deepcopy(m.state_dict()) for m in models),
                         pl_module.local_metrics["train/online/round"]))  # fmt: skip

    start = copy.deepcopy(module.reference.model.state_dict())
    fit(module, 6, tmp_path, Watch())
    steps = [s for s, *_ in seen]
    assert steps == [1, 2, 3, 4, 5, 6] and [r for *_, r in seen] == [1, 1, 1, 2, 2, 2]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(seen[0][1], start) and same(seen[1][1], start)  # round 1: the starting model
    assert same(seen[2][1], seen[2][2]) and not same(seen[2][1], start)  # step 3: reference <- policy
    assert same(seen[4][1], seen[2][2]) and not same(seen[4][2], seen[2][2])  # round 2: fixed; policy moves


# --- configs ----------------------------------------------------------------------------------


def test_online_dpo_config_mistakes_are_refused_before_any_weights_load(tmp_path):
    def cfg(*overrides):
        return compose_config([*FAST, "system=online_dpo", "callbacks.samples=null", *overrides], tmp_path)

    refusals = {
        ("loss=sft",): "trains on one response",
        ("system.samples_per_prompt=1",): r"samples_per_prompt=1 must be >= 2",
        ("system.pairs_per_prompt=3",): "1 or null with pairs=best_worst",
        ("system.judge={kind: self}",): "needs system.template",
        ("system.judge={kind: oracle}",): r"system.judge.kind='oracle'",
        ("system.judge={kind: self, orders: first}",): "system.judge.orders",
        ("system.judge={kind: self}", "system.reward={name: vader}"): "both label the samples",
        ("system.rounds=3", "trainer.max_steps=10"): "multiple of rounds x system.epochs",
        ("system.rounds=2", "trainer.max_steps=10", "reference=lora"): "use reference=copy",
        ("reference=precomputed",): "precomputed for the data's pairs only",
        ("reference=none",): "needs a reference model but reference=none",
        ("trainer=fsdp_cpu",): "not a sharded",
        ("data.batch_size=16", "data.micro_batch_size=8"): "steps its optimizer itself",
    }
    for overrides, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            validate(cfg(*overrides))
    validate(cfg("system.rounds=2", "trainer.max_steps=10"))
    validate(cfg("reference=none", "loss=simpo"))  # a reference-free pair loss needs no reference


# --- the CLI: judge=self, DDP, kill -9 ----------------------------------------------------------

TINY_CLI = [
    "experiment=tiny", "model.architecture.n_layer=1", "model.architecture.n_embd=32",
    "model.architecture.n_head=2", "model.tokenizer.bpe_vocab_size=300", "data.max_length=64",
    "data.max_prompt_length=32", "data.source.max_rows=97", "logger=csv", "trainer.log_every_n_steps=1",
    "system.generation.max_new_tokens=8", "system.samples_per_prompt=4", "callbacks.samples=null",
    "++trainer.limit_val_batches=0", "data.batch_size=8", "data.micro_batch_size=8", "optim.optimizer.lr=1e-3",
]  # fmt: skip


def env(root: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", DPO_CACHE_DIR=str(root / "cache"), PYTHONPATH=str(TESTS))


def command(out: Path, *overrides: str, system: str = "online_dpo") -> list[str]:
    """A tiny CLI run of a system that samples its own data (online DPO here; GRPO, RLOO in test_grpo)."""
    return [sys.executable, "-m", "dpo.commands.train", f"hydra.run.dir={out}", f"system={system}", *TINY_CLI,
            *overrides]  # fmt: skip


def run_cli(out: Path, *overrides: str, system: str = "online_dpo") -> list[dict[str, str]]:
    proc = subprocess.run(command(out, *overrides, system=system), capture_output=True, text=True,
                          env=env(out.parent), timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return list(csv.DictReader((out / "csv" / "metrics.csv").open()))


def losses(rows: list[dict[str, str]]) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def test_a_model_judging_itself_labels_pairs_through_the_judge_with_the_sampler_as_judge(tmp_path, monkeypatch):
    """Mechanics only (a 135M judge cannot judge: the win-rate miniature measured position bias 1.00):
    judge=self asks the local judge built on the sampling model about every pair of samples. In one
    random order per pair its letter bias makes pairs; in both orders the same bias would tie every
    sample with every other (each wins as A, loses as B) and make none."""
    from dpo.judges.local import LocalLMJudge

    calls = []
    real = LocalLMJudge.letter_logprobs

    def spy(self, texts):
        calls.append((self.model, len(texts)))
        return real(self, texts)

    monkeypatch.setattr(LocalLMJudge, "letter_logprobs", spy)
    from dpo.commands.train import train

    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = (pl_module.sampler(), pl_module.local_metrics)

    over = ["system.judge={kind: self, orders: random}", "+template@system.template=positive", "system.rounds=2",
            "trainer.max_steps=2", "model.architecture.n_positions=512"]  # the judge's input: ~300 tokens
    cfg = compose_config([*FAST, "system=online_dpo", *TINY_CLI[1:], *over], tmp_path)
    train(cfg, extra_callbacks=[Grab()])
    assert sorted(seen) == [1, 2] and len(calls) == 2
    assert all(n == 8 * 6 for _, n in calls)  # 8 prompts x C(4,2) pairs of samples
    for (model, _), step in zip(calls, (1, 2), strict=True):
        sampler, metrics = seen[step]
        assert model is sampler  # the round's sampling model is the judge (rounds: the reference's model)
        assert metrics["train/online/pairs"] > 0  # a judge's wins rank the samples: pairs come of them


@pytest.mark.slow
def test_online_dpo_under_ddp_on_two_cpu_processes_equals_one_process(tmp_path):
    """The same global batches of 8 prompts: one process, or two of 4 prompts each. Samples are
    drawn per (step, row, sample), the loss is the mean over every rank's pairs: the per-step
    losses and rewards agree to fp32 rounding (padding widths differ between the layouts)."""
    over = ("trainer.max_steps=3", "system.epochs=1", "reward=tfidf")  # TF-IDF labels: few ties, pairs every step
    one = run_cli(tmp_path / "one", *over)
    two = run_cli(tmp_path / "two", *over, "trainer=ddp_cpu", "data.micro_batch_size=4")
    pick = lambda rows, key: {r["step"]: float(r[key]) for r in rows if r.get(key)}  # noqa: E731
    for key in ("train/loss", "train/online/reward", "train/online/pairs"):
        expected = pick(one, key)
        assert len(expected) == 3 and pick(two, key) == pytest.approx(expected, abs=1e-5), key


@pytest.mark.slow
def test_kill_9_mid_round_then_the_same_command_resumes_the_same_losses(tmp_path):
    """Iterative DPO, 2 rounds of 5 steps, checkpoints every 3: killed after step 3's checkpoint
    (mid-round 1), the same command resumes there and every step's loss equals an uninterrupted run's."""
    over = ["system.rounds=2", "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=3",
            "reward=tfidf"]  # TF-IDF labels: pairs (and a loss) at every step
    assert_kill_9_resumes_the_same_losses(tmp_path, over)


def assert_kill_9_resumes_the_same_losses(tmp_path: Path, over: list[str], system: str = "online_dpo") -> None:
    """10 steps, checkpoints every 3: an uninterrupted run; the same run killed (SIGKILL) after its first
    checkpoint; the same command again resumes there and every step's loss equals the uninterrupted run's."""
    import time

    full = losses(run_cli(tmp_path / "full", *over, system=system))
    out = tmp_path / "killed"
    slow = ["+callbacks.slow._target_=tests_helpers.SlowSteps", "+callbacks.slow.seconds=0.4"]
    proc = subprocess.Popen(command(out, *over, *slow, system=system), env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    start = time.time()
    while find_last(out / "checkpoints") is None:
        assert time.time() - start < 300, "no checkpoint"
        time.sleep(0.1)
    time.sleep(0.6)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step, _ = checkpoint_tensors(out / "checkpoints" / LAST)
    assert 3 <= step < 10
    resumed = losses(run_cli(out, *over, *slow, system=system))
    assert [s for s, _ in resumed] == [s for s, _ in full] and len(full) == 10
    assert [v for _, v in resumed] == pytest.approx([v for _, v in full], abs=1e-6)
