"""The non-finite guard: a NaN gradient in one optimizer step stops the run naming the step and its
rows (the last checkpoint untouched), or is skipped and counted."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from tests_helpers import PoisonGradient

from conftest import compose_config
from dpo.commands.train import train
from dpo.runtime.checkpoint import LAST, checkpoint_tensors
from dpo.systems.base import NonFiniteError

RUN = [
    "experiment=tiny", "logger=csv", "trainer.max_steps=6", "trainer.log_every_n_steps=1", "data.source.max_rows=96",
    "data.batch_size=16", "data.micro_batch_size=8", "callbacks.model_checkpoint.every_n_train_steps=2",
    "model.architecture.n_layer=1", "model.architecture.n_embd=32", "model.architecture.n_head=2",
    "model.tokenizer.bpe_vocab_size=300", "data.max_length=64", "data.max_prompt_length=32",
]  # fmt: skip


def test_stop_names_the_step_and_rows_and_keeps_the_last_checkpoint(tmp_path):
    cfg = compose_config([*RUN, "guard.non_finite=stop"], tmp_path)
    with pytest.raises(NonFiniteError, match=r"optimizer step 3 \(training rows \[(\d+, ){15}\d+\]") as info:
        train(cfg, extra_callbacks=[PoisonGradient(step=3)])
    assert "guard.non_finite=skip" in str(info.value)
    step, shapes = checkpoint_tensors(tmp_path / "checkpoints" / LAST)  # the step-2 checkpoint, whole
    assert step == 2 and shapes
    weights = torch.load(tmp_path / "checkpoints" / LAST, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "hf").exists()  # nothing exported from a broken run


def test_skip_drops_the_update_and_counts_it(tmp_path, caplog):
    cfg = compose_config([*RUN, "guard.non_finite=skip"], tmp_path)
    seen = {}

    class Watch(PoisonGradient):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and batch_idx % trainer.accumulate_grad_batches == 0:
                seen["before"] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}
                seen["state"] = {k: v["step"].clone() for k, v in trainer.optimizers[0].state.items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and "after" not in seen:
                seen["after"] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}
                seen["state_after"] = {k: v["step"].clone() for k, v in trainer.optimizers[0].state.items()}

    with caplog.at_level("INFO"):
        metrics = train(cfg, extra_callbacks=[Watch(step=3)])
    assert math.isfinite(metrics["val/loss"])
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])  # weights unchanged
    assert all(torch.equal(seen["state"][k], seen["state_after"][k]) for k in seen["state"])  # Adam's steps too
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("train/loss")) == 6  # the step count and the schedule went on
    assert "guard: skipped 1 optimizer step(s)" in caplog.text
