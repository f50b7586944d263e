"""The reward-model system: it learns the bundled preference to held-out accuracy above 0.9; its export
loads as a one-label AutoModelForSequenceClassification and scores, through `reward=learned_rm`, exactly
what training scored; the Bradley-Terry loss by hand; Best-of-N picks in dpo-eval's completions format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import FAST, compose_config
from dpo.commands.train import begin, build, train
from dpo.rewards.learned import encode, last_token_scores
from dpo.rewards.registry import build_reward
from dpo.runtime.io import read_jsonl, write_jsonl
from dpo.systems.reward_model import bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    """r_w - r_l = 0: ln 2; = 2: ln(1 + e^-2) = 0.126928; = -1: ln(1 + e) = 1.313262."""
    losses = bradley_terry_loss(torch.tensor([0.0, 3.0, -1.0]), torch.tensor([0.0, 1.0, 0.0]))
    assert losses.tolist() == pytest.approx([math.log(2), 0.126928, 1.313262], abs=1e-6)


def test_last_token_scores_ignore_padding_on_either_side(tiny_model, bpe_tokenizer):
    from conftest import TINY_ARCH
    from dpo.models.load import ModelConfig
    from dpo.rewards.learned import load_reward_model

    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(None, architecture=TINY_ARCH), tokenizer=bpe_tokenizer).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = last_token_scores(model, ids, torch.ones_like(ids))
    right = last_token_scores(model, torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """experiment=tiny system=reward_model on the bundled reviews (chosen: a positive review of the
    film; rejected: a negative or degenerate one), 30 steps of 16 pairs."""
    out = tmp_path_factory.mktemp("rm")
    overrides = [*FAST, "system=reward_model", "callbacks.samples=null", "trainer.max_steps=30",
                 "data.batch_size=16", "data.micro_batch_size=16", "data.source.max_rows=null",
                 "optimized_metric=val/rm/accuracy"]  # fmt: skip
    cfg = compose_config(overrides, out)
    after = train(cfg)
    return cfg, out, after


def test_reward_model_learns_the_preference_to_held_out_accuracy_above_0_9(trained_rm):
    cfg, out, after = trained_rm
    state = json.loads((out / "run.json").read_text())
    assert state["before"]["val/rm/accuracy"] < 0.75 and after["val/rm/accuracy"] > 0.9, after
    assert after["val/rm/margin"] > state["before"]["val/rm/margin"]


def test_the_export_is_a_sequence_classifier_that_learned_rm_scores_as_training_did(trained_rm):
    """Every held-out pair through the training path (collated rows, score at the EOS) and through
    `reward=learned_rm` on the text prompt + response: the same scores where the text tokenizes to
    the training row's tokens (the response starts at a word boundary), which is most rows."""
    cfg, out, _ = trained_rm
    model = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    reward = build_reward("learned_rm", path=str(out / "hf"), batch_size=7)
    run = build(cfg, begin(cfg))
    data = run.datamodule
    model.eval()
    from dpo.data.formats import load_rows

    rows, _ = load_rows(data.source, "val", on_bad_row=cfg.data.on_bad_row, tokenizer=run.tokenizer)
    items = data.datasets["val"].items
    same = [(r, it) for r, it in zip(rows, items, strict=True)
            if encode(reward.tokenizer, r.prompt + r.chosen, None) == it.prompt_ids + it.chosen_ids]  # fmt: skip
    assert len(same) >= len(items) // 2, f"only {len(same)} of {len(items)} rows tokenize alike"
    batch = data.collate_fn([it for _, it in same[:16]])
    n = batch["n_pairs"]
    with torch.no_grad():
        trained = last_token_scores(model, batch["input_ids"], batch["attention_mask"])[:n]
    scored = reward([r.prompt + r.chosen for r, _ in same[:16]])
    assert scored == pytest.approx(trained.tolist(), abs=1e-4)


def test_best_of_n_writes_the_picked_completions_for_dpo_eval(tmp_path):
    """Rewards [0.1, 0.9, 0.5] and [0.7, 0.2, 0.3]: best of 2 picks b and d; best of 3 picks b and d."""
    from omegaconf import OmegaConf

    from dpo.commands.best_of_n import run

    scored = write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": "P1", "completions": ["a", "b", "c"], "rewards": [0.1, 0.9, 0.5]},
        {"prompt": "P2", "completions": ["d", "e", "f"], "rewards": [0.7, 0.2, 0.3]},
    ])  # fmt: skip
    (tmp_path / "scored.jsonl.meta.json").write_text(json.dumps({"samples_meta": {"generation": {"temperature": 0.7}}}))
    cfg = OmegaConf.create({"input": str(scored), "ns": [2, 3], "output": str(tmp_path / "eval.jsonl"),
                            "completions": str(tmp_path / "picks.jsonl")})  # fmt: skip
    run(cfg)
    picks = read_jsonl(
        tmp_path / "picks.jsonl", {"policy": str, "temperature": float, "prompt": str, "completion": str}
    )
    assert [(p["policy"], p["prompt"], p["completion"], p["temperature"]) for p in picks] == [
        ("best_of_2", "P1", "b", 0.7), ("best_of_2", "P2", "d", 0.7),
        ("best_of_3", "P1", "b", 0.7), ("best_of_3", "P2", "d", 0.7),
    ]  # fmt: skip


def test_a_monitored_checkpoint_callback_keeps_measures_and_exports_the_best(tmp_path):
    """callbacks.model_checkpoint.monitor (imdb_rm: val/rm/accuracy, max; App. C.1 keeps the best
    validation checkpoint): the summary's held-out metrics and the hf export are the best
    checkpoint's, not the last's. Monitoring val/loss with mode=max makes the best the first
    validation's (the loss falls as it trains), so best and last differ."""
    from safetensors.torch import load_file

    overrides = [*FAST, "system=reward_model", "callbacks.samples=null", "trainer.max_steps=12",
                 "data.batch_size=16", "data.micro_batch_size=16", "data.source.max_rows=null",
                 "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.check_val_every_n_epoch=null",
                 "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max",
                 "callbacks.model_checkpoint.save_top_k=1"]  # fmt: skip
    cfg = compose_config(overrides, tmp_path)
    after = train(cfg)
    checkpoints = tmp_path / "checkpoints"
    best = sorted(p for p in checkpoints.glob("step*.ckpt"))
    assert [p.name for p in best] == ["step000004.ckpt"], list(checkpoints.iterdir())
    saved = torch.load(best[0], map_location="cpu", weights_only=True)
    recorded = [v["best_model_score"] for v in saved["callbacks"].values() if "best_model_score" in v]
    assert after["val/loss"] == pytest.approx(float(recorded[0]), abs=1e-6)  # measured on the best weights
    exported = load_file(next((tmp_path / "hf").glob("*.safetensors")))
    last_ckpt = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last_ckpt["global_step"] == 12  # last.ckpt follows training, not the last improvement (resume)
    last = last_ckpt["state_dict"]
    state = saved["state_dict"]
    name = next(k for k in exported if k.endswith("score.weight"))
    trained = next(v for k, v in state.items() if k.endswith("score.weight"))
    assert torch.equal(exported[name], trained) and not torch.equal(exported[name], next(
        v for k, v in last.items() if k.endswith("score.weight")))
    summary = (tmp_path / "hf" / "README.md").read_text()
    assert "best by val/loss, exported: " in summary


def test_a_monitor_that_keeps_nothing_is_refused_before_weights_load(tmp_path):
    from dpo.config.settings import ConfigError

    cfg = compose_config([*FAST, "system=reward_model", "callbacks.samples=null",
                          "callbacks.model_checkpoint.monitor=val/rm/accuracy"], tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match=r"monitor=val/rm/accuracy keeps nothing with save_top_k=0"):
        build(cfg, begin(cfg))
