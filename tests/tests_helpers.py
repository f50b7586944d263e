"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

import lightning.pytorch as pl

from dpo.data.batch import Layout
from dpo.data.datamodule import DataConfig, PreferenceDataModule
from dpo.data.sources import SourceSpec, bundled_path


def tiny_data_config(source: SourceSpec, **kwargs) -> DataConfig:
    """A data config for quick tests: global and micro batch 4, lengths 64/32, no cache."""
    settings = {"batch_size": 4, "micro_batch_size": 4, "eval_batch_size": 8, "max_length": 64,
                "max_prompt_length": 32, "cache_dir": None} | kwargs  # fmt: skip
    return DataConfig(source=source, **settings)


def tiny_datamodule(
    tokenizer, pairs: bool = True, max_rows: int | None = None, layout: Layout = Layout.separate
) -> PreferenceDataModule:
    """The bundled validation pairs as both splits, micro-batch 4, lengths 64/32, no cache."""
    path = bundled_path("reviews_val.jsonl")
    source = SourceSpec("fields", {"train": path, "val": path}, None, max_rows=max_rows)
    return PreferenceDataModule(tokenizer, tiny_data_config(source), pairs=pairs, layout=layout)


class SlowSteps(pl.Callback):
    """Sleeps after every training batch, so a test can kill a run between two checkpoints."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        import time

        time.sleep(self.seconds)


class PoisonGradient(pl.Callback):
    """Puts a NaN into one gradient of optimizer step ``step`` (1-based): the non-finite guard's test."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in pl_module.policy.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class CountValBatches(pl.Callback):
    """Writes how many validation batches each rank ran, to ``<out>/val_batches_rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out, self.count = out, 0

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        from pathlib import Path

        self.count += 1
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"val_batches_rank{trainer.global_rank}.txt").write_text(str(self.count))
