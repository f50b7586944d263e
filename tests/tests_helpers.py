"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

from dpo.data.datamodule import PreferenceDataModule
from dpo.data.sources import SourceSpec, bundled_path


def tiny_datamodule(tokenizer, pairs: bool = True, max_rows: int | None = None) -> PreferenceDataModule:
    """The bundled validation pairs as both splits, micro-batch 4, lengths 64/32, no cache."""
    path = bundled_path("reviews_val.jsonl")
    source = SourceSpec("fields", {"train": path, "val": path}, max_rows=max_rows)
    return PreferenceDataModule(
        tokenizer, source, batch_size=4, eval_batch_size=8, max_length=64, max_prompt_length=32, pairs=pairs
    )
