"""GenerationSamples: left padding, greedy determinism, files written; gradient checkpointing is exact."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import FAST, compose_config, shrink
from dpo.commands.train import train
from dpo.models.sampling import left_pad


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_samples_are_written_and_match_plain_generate(tmp_path):
    cfg = shrink(
        compose_config(
            [
                *FAST,
                "trainer.max_steps=2",
                "callbacks.samples.temperature=0",
                "callbacks.samples.n_prompts=3",
                "callbacks.samples.max_new_tokens=6",
            ],
            tmp_path,
        )
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "samples" / "step000002.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == rows[0]["completion"]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    def losses(name, *extra):
        cfg = shrink(
            compose_config([*FAST, "trainer.max_steps=3", "trainer.log_every_n_steps=1", *extra], tmp_path / name)
        )
        train(cfg)
        rows = list(csv.DictReader((tmp_path / name / "csv" / "metrics.csv").open()))
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    plain, checkpointed = losses("plain"), losses("ckpt", "model.gradient_checkpointing=true")
    assert len(plain) == 3 and checkpointed == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_reward_kl_eval_logs_reward_and_exact_kl(tmp_path, loss):
    """At step 0 the policy is the reference: KL exactly 0. After training it is > 0, also for
    Preferred-FT (loss=sft), which has no reference of its own: the callback keeps a frozen copy."""
    cfg = shrink(
        compose_config(
            [
                *FAST, f"loss={loss}", "callbacks=reward_eval", "trainer.max_steps=3", "optim.optimizer.lr=1e-2",
                "callbacks.reward_eval.n_prompts=3", "callbacks.reward_eval.samples_per_prompt=2",
                "callbacks.reward_eval.generation.max_new_tokens=5", "callbacks.reward_eval.every_n_steps=2",
            ],
            tmp_path,
        )
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert rows[0]["kl"] == 0 and rows[0]["kl_mc"] == 0 and rows[0]["n"] == 6
    assert rows[-1]["kl"] > 0 and all(-1 <= r["reward"] <= 1 for r in rows)  # VADER compound
    samples = [json.loads(x) for x in (tmp_path / "eval" / "step000003.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["kl"] >= 0 for s in samples)
    logged = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert sum(1 for r in logged if r.get("eval/kl")) == 3
