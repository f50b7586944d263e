"""GenerationSamples: left padding, greedy determinism, files written; gradient checkpointing is exact."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import FAST, compose_config, shrink
from dpo.callbacks import left_pad
from dpo.train import train


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
