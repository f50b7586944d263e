"""Run names, groups and the flat config that wandb shows (dpo.report.naming)."""

from __future__ import annotations

from dpo.report.naming import flatten, run_label


def test_a_run_is_labelled_by_its_overrides_with_short_unambiguous_keys():
    overrides = ["loss.beta=0.1", "optim.optimizer.lr=1e-6", "loss=ipo_sum", "hydra.run.dir=/x", "paths.log_dir=/y",
                 "run_name=a", "+trainer.max_steps=10"]  # fmt: skip
    assert run_label("train", overrides) == "train beta=0.1 lr=1e-6 loss=ipo_sum max_steps=10"


def test_keys_sharing_a_last_part_keep_their_full_name_and_secrets_are_left_out():
    overrides = ["callbacks.reward_eval.seed=1", "seed=2", "reward.token=hf_abcdefghijklmnopqrstuvwxyz0123",
                 "logger.wandb.api_key=xyz", "data.batch_size=8"]  # fmt: skip
    label = run_label("dpo", overrides)
    assert label == "dpo callbacks.reward_eval.seed=1 seed=2 batch_size=8"
    assert "hf_abc" not in label and "xyz" not in label


def test_the_config_is_flattened_to_dotted_keys():
    config = {"loss": {"name": "dpo", "beta": 0.1}, "tags": ["a"], "optim": {"optimizer": {"lr": 1e-6}}, "x": {}}
    assert flatten(config) == {"loss.name": "dpo", "loss.beta": 0.1, "tags": ["a"], "optim.optimizer.lr": 1e-6, "x": {}}
