"""The IMDB pipeline in miniature, end to end on a tiny model: sample, score, pair, DPO and a
baseline with the evaluation callback, Best-of-N, and the frontier plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

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
              "system.samples_per_prompt=1", "system.generation.max_new_tokens=6"]  # fmt: skip
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
    assert labels == {"DPO b=0.1", "Unlikelihood a=0.5", "PPO-GT kl=0.2->4", "Best-of-N"}
    costs = out.with_name("frontier_costs.md").read_text()
    ppo_row = next(line for line in costs.splitlines() if line.startswith("| PPO-GT kl=0.2->4 |"))
    assert int(ppo_row.split("|")[-2]) > 0  # PPO-GT's rollout tokens, counted exactly


@pytest.mark.slow
def test_the_paper_scale_imdb_stages_run_end_to_end_on_stand_ins(tmp_path, exported_tiny, bpe_tokenizer):
    """Issue 26: every stage of the paper-scale IMDB configs, as composed, on the IMDB fixture and
    tiny stand-ins (the model for gpt2-large, a tiny local classifier for the RoBERTa): SFT on
    2-8 token prefixes; dpo-sample of the train split's prefixes; dpo-score with the classifier's
    probability; dpo-pair; the reward model keeping its best validation checkpoint; DPO evaluated
    on the test split's prefixes; PPO-GT with the adaptive target-KL controller and normalised
    rewards; PPO against the reward model."""
    import torch
    from hydra import compose, initialize_config_dir
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from conftest import FIXTURES
    from dpo.commands.cli import CONF_DIR
    from dpo.commands.pair import pair
    from dpo.commands.sample import sample
    from dpo.commands.score import score
    from dpo.commands.train import train
    from dpo.runtime.io import read_jsonl

    torch.manual_seed(0)
    clf = tmp_path / "clf"
    config = GPT2Config(vocab_size=len(bpe_tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=256, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                        pad_token_id=bpe_tokenizer.pad_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(clf)
    bpe_tokenizer.save_pretrained(clf)
    classifier = {"reward.pretrained": str(clf), "reward.max_length": 128, "reward.device": "cpu"}

    def stage(name: str, *overrides: str) -> Path:
        out = tmp_path / name
        cfg = shrink(compose_config([*FAST, f"experiment={name}", *overrides], out), exported_tiny)
        composed = compose_config([f"experiment={name}"], out).reward
        with open_dict(cfg):
            if composed is not None and composed.name == "hf_classifier":  # shrink swapped it for VADER; the stand-in
                cfg.reward = composed
                for key, value in classifier.items():
                    OmegaConf.update(cfg, key, value)
                if cfg.callbacks.get("reward_eval") is not None:
                    cfg.callbacks.reward_eval.reward = cfg.reward
        train(cfg)
        return out

    sft = stage("imdb_sft", "trainer.max_steps=2")
    assert (sft / "hf").is_dir()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[
            "data=imdb", f"data.source.path={FIXTURES / 'imdb'}", f"model.pretrained={sft / 'hf'}", "n=4",
            "generation.max_new_tokens=6", f"output={tmp_path / 'samples.jsonl'}", f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    samples = sample(cfg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("score", overrides=[
            f"input={samples}", f"output={tmp_path / 'scored.jsonl'}", "reward=hf_classifier",
            f"paths.output_dir={tmp_path}", *(f"{k}={v}" for k, v in classifier.items())])  # fmt: skip
    assert cfg.reward.output == "prob"
    scored = read_jsonl(score(cfg), {"rewards": list})
    assert all(0 <= r <= 1 for row in scored for r in row["rewards"])  # probabilities
    pairs = pair(OmegaConf.create({"input": str(tmp_path / "scored.jsonl"), "output_dir": str(tmp_path / "pairs"),
                                   "min_margin": 0.0, "ties": "random", "val_fraction": 0.34, "seed": 0}))  # fmt: skip
    data = [f"data.source.splits.train={pairs / 'train.jsonl'}", f"data.source.splits.val={pairs / 'val.jsonl'}",
            f"model.pretrained={sft / 'hf'}"]  # fmt: skip
    rm = stage("imdb_rm", *data, "trainer.max_steps=4", "trainer.max_epochs=null", "trainer.val_check_interval=2",
               "trainer.check_val_every_n_epoch=null")  # fmt: skip
    assert list((rm / "checkpoints").glob("step*.ckpt")), "the best checkpoint by val/rm/accuracy is kept"
    evaluation = ["callbacks.reward_eval.n_prompts=2", "callbacks.reward_eval.generation.max_new_tokens=4"]
    dpo = stage("imdb_dpo", *data, *evaluation, "trainer.max_steps=2")
    evaluated = read_jsonl(dpo / "eval" / "step000000.jsonl", {"prompt": str, "reward": float})
    assert all(0 < r["reward"] < 1 for r in evaluated)  # the stand-in classifier's probabilities (VADER gives 0s)
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec

    fixture = SourceSpec("imdb", {"test": "test"}, str(FIXTURES / "imdb"))
    test_reviews = [" ".join((r.prompt + r.chosen).split()) for r in load_rows(fixture, "test")[0]]
    assert all(any(t.startswith(" ".join(r["prompt"].split())) for t in test_reviews) for r in evaluated)
    ppo = ["system.minibatch_size=2", "system.ppo_epochs=1", "system.generation.max_new_tokens=4",
           "data.micro_batch_size=2", "data.batch_size=2", "trainer.max_steps=2", *evaluation]  # fmt: skip
    stage("imdb_ppo_gt", *data, *ppo, "system.reward_norm=standardize")
    stage("imdb_ppo", *data, *ppo, f"system.reward.path={rm / 'hf'}")
