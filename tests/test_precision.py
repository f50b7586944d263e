"""Weights that can learn: the TL;DR configs keep float32 master weights under bf16 compute, and pure
low-precision weights with a learning rate too small to move them are refused before anything loads."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from conftest import FAST, compose_config, shrink
from dpo.config import ConfigError, check_update_precision, validate
from dpo.train import begin, build


def fraction_moved_by_one_step(tmp_path, exported_tiny, dtype: str) -> float:
    """experiment=tldr_dpo on the tiny model: one RMSprop step at lr 1e-6 (no warmup) under
    bf16-mixed; the fraction of the decoder blocks' weight-matrix entries that changed (every one of
    them gets a gradient, unlike unused embedding rows)."""
    cfg = shrink(compose_config([*FAST, "experiment=tldr_dpo", "trainer.max_steps=1", "optim.warmup_steps=0",
                                 "trainer.limit_val_batches=0"], tmp_path), exported_tiny)  # fmt: skip
    with open_dict(cfg):
        cfg.trainer.precision = "bf16-mixed"
        cfg.model.dtype = dtype
        cfg.guard.low_precision = "allow"  # to measure what the check prevents
    assert cfg.optim.optimizer.lr == 1e-6 and "RMSprop" in cfg.optim.optimizer._target_
    run = build(cfg, begin(cfg))
    blocks = {n: p for n, p in run.module.policy.named_parameters() if ".h." in n and p.dim() == 2}
    before = {n: p.detach().clone() for n, p in blocks.items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in blocks.items())
    return moved / sum(p.numel() for p in blocks.values())


def test_the_tldr_config_moves_every_weight_at_lr_1e_6_and_pure_bf16_does_not(tmp_path, exported_tiny):
    """The premise, measured: with float32 master weights (the fixed config) one step at lr 1e-6 moves
    every decoder weight; with pure bf16 weights (the old config) most updates round away."""
    assert fraction_moved_by_one_step(tmp_path / "fp32", exported_tiny, "float32") == 1.0
    assert fraction_moved_by_one_step(tmp_path / "bf16", exported_tiny, "bfloat16") < 0.5


def test_the_tldr_configs_keep_float32_master_weights_sharded(tmp_path):
    for name in ("tldr_sft", "tldr_dpo"):
        cfg = compose_config([f"experiment={name}"], tmp_path)
        assert cfg.model.dtype.value == "float32" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.strategy._target_.endswith("ModelParallelStrategy")  # trainer=fsdp


@pytest.mark.parametrize(("dtype", "lr", "refused"), [
    ("bfloat16", 1e-6, True),    # the old TL;DR config: 1e-6 < 0.02 * 2^-7 / 2 = 7.8e-5
    ("bfloat16", 5e-5, True),
    ("bfloat16", 1e-4, False),
    ("float16", 1e-6, True),     # 0.02 * 2^-10 / 2 = 9.8e-6
    ("float16", 2e-5, False),
    ("float32", 1e-9, False),
])  # fmt: skip
def test_low_precision_weights_with_a_tiny_lr_are_refused_with_the_reason(tmp_path, dtype, lr, refused):
    cfg = compose_config([*FAST, f"model.dtype={dtype}", f"optim.optimizer.lr={lr}"], tmp_path)
    if refused:
        with pytest.raises(ConfigError, match=r"round away.*model.dtype=float32 trainer.precision=(bf)?16-mixed"):
            validate(cfg)
        with open_dict(cfg):
            cfg.guard.low_precision = "allow"
    check_update_precision(cfg)


def test_the_old_tldr_config_is_refused_before_any_weights_load(tmp_path, exported_tiny, monkeypatch):
    import dpo.train

    monkeypatch.setattr(dpo.train, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = shrink(compose_config([*FAST, "experiment=tldr_dpo"], tmp_path), exported_tiny)
    with open_dict(cfg):
        cfg.model.dtype = "bfloat16"  # what experiment=tldr_dpo said before
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 with optim.optimizer.lr=1e-06"):
        begin(cfg)
    assert torch.get_default_dtype() == torch.float32
