"""The IMDB pipeline in miniature, end to end on a tiny model: sample, score, pair, DPO and a
baseline with the evaluation callback, Best-of-N, and the frontier plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, compose_config, shrink

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_miniature_pipeline_end_to_end(tmp_path, exported_tiny):
    from dpo.commands.best_of_n import run as best_of_n
    from dpo.commands.pair import pair
    from dpo.commands.sample import sample
    from dpo.commands.score import score
    from dpo.commands.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(line + "\n" for line in (ROOT / "dpo/data/files/review_prompts.txt").read_text().split("\n")[:24])
    )
    paths = {"cache_dir": str(tmp_path / "cache")}
    model = {"pretrained": exported_tiny, "revision": None, "dtype": "float32", "trust_remote_code": False,
             "tokenizer": {"pretrained": None}}  # fmt: skip
    gen = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    samples = sample(OmegaConf.create({
        "paths": paths, "seed": 0, "model": model, "n": 4, "batch_size": 32, "generation": gen,
        "prompts": {"file": str(prompts), "field": "prompt", "split": "train", "max_prompts": None},
        "output": str(tmp_path / "samples.jsonl"),
    }))  # fmt: skip
    scored = score(OmegaConf.create({
        "paths": paths, "input": str(samples), "output": str(tmp_path / "scored.jsonl"), "include_prompt": False,
        "batch_size": 64, "reward": {"name": "vader"},
    }))  # fmt: skip
    pairs = pair(OmegaConf.create({"input": str(scored), "output_dir": str(tmp_path / "pairs"), "min_margin": 0.0,
                                   "ties": "random", "val_fraction": 0.25, "seed": 0}))  # fmt: skip
    meta = json.loads((pairs / "pairs.meta.json").read_text())
    assert meta["pairs"]["train"] >= 8 and meta["pairs"]["val"] >= 1
    ppo_gt = ["experiment=imdb_ppo_gt_mini", "system.minibatch_size=1", "system.ppo_epochs=1",
              "system.generation.max_new_tokens=6"]  # fmt: skip
    runs = (("dpo", ["experiment=imdb_mini", "loss=dpo"]),
            ("ul", ["experiment=imdb_mini", "loss=unlikelihood", "loss.alpha=0.5"]), ("ppo_gt", ppo_gt))  # fmt: skip
    for name, overrides in runs:
        cfg = shrink(compose_config([
            *FAST, *overrides, "trainer.max_steps=4", "callbacks.reward_eval.every_n_steps=2",
            "callbacks.reward_eval.n_prompts=4", "callbacks.reward_eval.generation.max_new_tokens=6",
            f"data.source.splits.train={pairs / 'train.jsonl'}", f"data.source.splits.val={pairs / 'val.jsonl'}",
        ], tmp_path / "sweep" / name), exported_tiny)  # fmt: skip
        train(cfg)
        rows = [json.loads(x) for x in (tmp_path / "sweep" / name / "eval" / "eval.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 2, 4] and rows[0]["kl"] == 0
    best_of_n(OmegaConf.create({"input": str(scored), "ns": [1, 2, 4], "output": str(tmp_path / "bon" / "eval.jsonl")}))
    out = tmp_path / "frontier.png"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/imdb/frontier.py"), str(tmp_path / "sweep"),
                           str(tmp_path / "bon"), "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = {json.loads(x)["label"] for x in out.with_suffix(".jsonl").read_text().splitlines()}
    assert labels == {"DPO b=0.1", "Unlikelihood a=0.5", "PPO-GT kl=0.2", "Best-of-N"}
    costs = out.with_name("frontier_costs.md").read_text()
    ppo_row = next(line for line in costs.splitlines() if line.startswith("| PPO-GT kl=0.2 |"))
    assert int(ppo_row.split("|")[-2]) > 0  # PPO-GT's rollout tokens, counted exactly
