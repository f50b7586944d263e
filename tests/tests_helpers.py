"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

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
