"""The LightningDataModule serving tokenized preference pairs."""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from dpo.data.collate import collate
from dpo.data.sources import FieldMap, read_local
from dpo.data.tokenize import PairTokenizer, TokenizedPair, TruncationSide


class TokenizedDataset(Dataset[TokenizedPair]):
    """A list of tokenized rows."""

    def __init__(self, items: list[TokenizedPair]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.items[i]


class PreferenceDataModule(LightningDataModule):
    """Reads, validates and tokenizes local preference files; serves dynamically padded batches.

    All reading and tokenization happens in :meth:`setup`, which the entry point calls before any
    model is loaded so bad data fails fast. ``setup`` is idempotent.

    Args:
        tokenizer: tokenizer of the policy.
        train_path: training file (JSONL, Parquet or CSV).
        val_path: held-out file.
        fields: field names of prompt/chosen/rejected in the files.
        batch_size: pairs per device per step (micro-batch).
        eval_batch_size: pairs per device per validation step.
        max_length: most tokens in a prompt + response row.
        max_prompt_length: most prompt tokens kept when a pair must be truncated.
        truncation_side: ``keep_end`` or ``keep_start`` for the prompt.
        pairs: serve chosen and rejected (DPO) or chosen only (SFT).
        shuffle: shuffle the training pairs each epoch (seeded by ``seed``).
        seed: seed of the training shuffle.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_path: str,
        val_path: str,
        fields: FieldMap,
        batch_size: int,
        eval_batch_size: int,
        max_length: int,
        max_prompt_length: int,
        truncation_side: TruncationSide = "keep_end",
        pairs: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.paths = {"train": train_path, "val": val_path}
        self.fields = fields
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.pairs = pairs
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.pair_tokenizer_args = (max_length, max_prompt_length, truncation_side)
        self.datasets: dict[str, TokenizedDataset] = {}
        self.stats: dict[str, dict[str, float]] = {}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._collate = partial(collate, pad_id=pad_id, pairs=pairs)

    def setup(self, stage: str | None = None) -> None:
        """Read every split, validating all rows, then tokenize; logs length statistics."""
        if self.datasets:
            return
        rows = {split: read_local(path, self.fields, pairs=self.pairs) for split, path in self.paths.items()}
        for split, split_rows in rows.items():
            tokenize = PairTokenizer(self.tokenizer, *self.pair_tokenizer_args)
            self.datasets[split] = TokenizedDataset([tokenize(row) for row in split_rows])
            self.stats[split] = tokenize.stats.summary()
            rank_zero_info(f"data/{split} ({self.paths[split]}): {_fmt(self.stats[split])}")

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["val"],
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
