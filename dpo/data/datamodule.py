"""The LightningDataModule serving tokenized preference pairs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from transformers import PreTrainedTokenizerBase

from dpo.data import cache
from dpo.data.collate import collate
from dpo.data.formats import load_rows
from dpo.data.sources import SourceSpec, source_fingerprint
from dpo.data.tokenize import PairTokenizer, TokenizedPair, TruncationSide
from dpo.log import get_logger

log = get_logger(__name__)
SPLITS = ("train", "val")


class TokenizedDataset(Dataset[TokenizedPair]):
    """A list of tokenized rows with the prompt group of each (rows sharing a prompt share a group)."""

    def __init__(self, items: list[TokenizedPair], groups: list[int]) -> None:
        self.items = items
        self.groups = groups

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.items[i]


class GroupedShuffleSampler(Sampler[int]):
    """Shuffles prompt groups, then yields each group's pairs one after another.

    Keeps the several pairs of a prompt in the same or neighbouring batches (``group_by_prompt``).
    Each epoch draws a new order from ``seed`` and the epoch number.
    """

    def __init__(self, groups: list[int], seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        self.members = list(members.values())
        self.n = len(groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.members)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        self.epoch += 1
        for g in order:
            yield from self.members[g]

    def __len__(self) -> int:
        return self.n


class PreferenceDataModule(LightningDataModule):
    """Reads, validates, tokenizes and caches a preference source; serves padded batches.

    Reading and tokenization run in :meth:`prepare_data` (once per node, under Lightning) and,
    through the cache, in :meth:`setup`; the entry point calls ``setup`` before any model loads
    so bad data fails fast. Both are idempotent.

    Args:
        tokenizer: tokenizer of the policy.
        source: where the data lives and how to parse it.
        batch_size: pairs per device per step (micro-batch).
        eval_batch_size: pairs per device per validation step.
        max_length: most tokens in a prompt + response row.
        max_prompt_length: most prompt tokens kept when a pair must be truncated.
        truncation_side: ``keep_end`` or ``keep_start`` for the prompt.
        pairs: serve chosen and rejected (DPO) or chosen only (SFT).
        on_bad_row: ``error`` stops at the first bad row; ``skip`` counts and reports them.
        group_by_prompt: keep the pairs of one prompt together when shuffling.
        cache_dir: folder of the tokenized cache; None disables caching.
        shuffle: shuffle training pairs each epoch (seeded by ``seed``).
        seed: seed of the training shuffle.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: SourceSpec,
        batch_size: int,
        eval_batch_size: int,
        max_length: int,
        max_prompt_length: int,
        truncation_side: TruncationSide = "keep_end",
        pairs: bool = True,
        on_bad_row: str = "error",
        group_by_prompt: bool = False,
        cache_dir: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.lengths = (max_length, max_prompt_length, truncation_side)
        self.pairs = pairs
        self.on_bad_row = on_bad_row
        self.group_by_prompt = group_by_prompt
        self.cache_dir = cache_dir
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, TokenizedDataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.cache_hits: dict[str, bool] = {}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._collate = partial(collate, pad_id=pad_id, pairs=pairs)

    def cache_key(self, split: str) -> str:
        """Fingerprint of one tokenized split (see :mod:`dpo.data.cache`)."""
        return cache.fingerprint(
            {
                "source": source_fingerprint(self.source, split),
                "tokenizer": cache.tokenizer_fingerprint(self.tokenizer),
                "lengths": self.lengths,
                "pairs": self.pairs,
                "on_bad_row": self.on_bad_row,
            }
        )

    def _build(self, split: str) -> tuple[list[TokenizedPair], list[int], dict[str, Any]]:
        rows, report = load_rows(self.source, split, on_bad_row=self.on_bad_row, tokenizer=self.tokenizer)
        tokenize = PairTokenizer(self.tokenizer, *self.lengths)
        pairs = [tokenize(row if self.pairs else replace(row, rejected=None)) for row in rows]
        prompt_ids: dict[str, int] = {}
        groups = [prompt_ids.setdefault(row.prompt, len(prompt_ids)) for row in rows]
        meta = {
            "records": report.records,
            "pairs": len(pairs),
            "prompts": len(prompt_ids),
            "skipped": dict(report.skipped),
            "filtered": dict(report.filtered),
            **tokenize.stats.summary(),
        }
        return pairs, groups, meta

    def _load(self, split: str) -> None:
        pairs, groups, meta, hit = cache.get_or_build(self.cache_dir, self.cache_key(split), lambda: self._build(split))
        self.datasets[split] = TokenizedDataset(pairs, groups)
        self.stats[split] = meta
        self.cache_hits[split] = hit

    def prepare_data(self) -> None:
        """Tokenize and cache every split (Lightning runs this once per node)."""
        if self.cache_dir is not None:
            for split in SPLITS:
                cache.get_or_build(self.cache_dir, self.cache_key(split), lambda s=split: self._build(s))

    def setup(self, stage: str | None = None) -> None:
        """Load every split (from the cache when it holds them); log statistics and samples."""
        if self.datasets:
            return
        for split in SPLITS:
            self._load(split)
            origin = "cache hit" if self.cache_hits[split] else "tokenized"
            log.info(f"data/{split} ({origin}): {_fmt(self.stats[split])}")
        for text in self.samples(2):
            log.info(text)

    def samples(self, n: int) -> list[str]:
        """The first ``n`` training pairs as the model sees them, with token counts."""
        out = []
        for pair in self.datasets["train"].items[:n]:
            parts = [("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)]
            text = " | ".join(
                f"{name} ({len(ids)} tok): {self.tokenizer.decode(ids)!r}" for name, ids in parts if ids is not None
            )
            out.append(f"data/sample: {text}")
        return out

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        generator = torch.Generator().manual_seed(self.seed)
        if not self.shuffle:
            sampler = None
        elif self.group_by_prompt:
            sampler = GroupedShuffleSampler(data.groups, self.seed)
        else:
            sampler = RandomSampler(data, generator=generator)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
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


def _fmt(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
