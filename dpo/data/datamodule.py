"""The LightningDataModule serving tokenized preference pairs."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any

from lightning.pytorch import LightningDataModule
from omegaconf import MISSING
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from dpo.data import cache
from dpo.data.batch import Layout, ScoredBatch
from dpo.data.collate import collate, collate_prompts, pad_id_of
from dpo.data.formats import load_rows
from dpo.data.packing import pack_pairs
from dpo.data.samplers import GlobalBatchSampler, ShardBatches
from dpo.data.sources import DataError, SourceSpec, source_fingerprint
from dpo.data.tokenize import PairTokenizer, TokenizedPair, TruncationSide
from dpo.data.unpaired import unpaired, with_kl_completions
from dpo.runtime.checks import refuse
from dpo.runtime.log import get_logger
from dpo.runtime.progress import track

log = get_logger(__name__)
SPLITS = ("train", "val")


class OnBadRow(str, Enum):
    """What a row that cannot be used does (``data.on_bad_row``)."""

    error = "error"  # stop at the first bad row, naming the file and row
    skip = "skip"  # count bad rows by reason and report them


@dataclass
class ResponseSpec:
    """``data.response``: what a response of this data set looks like when a model writes one.

    Sampling (``dpo-sample``, ``dpo-eval``) takes its defaults from here, so ``data=hh`` brings its
    stop string with it.

    Attributes:
        max_new_tokens: most tokens sampled for one response.
        stop: strings that end a response (cut before the first; e.g. HH's next ``"\\n\\nHuman:"``).
    """

    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """``conf/data``: the preference source, its tokenization and the batch plan.

    Attributes:
        source: where the rows live and which parser reads them.
        on_bad_row: stop at the first bad row or skip and count them.
        group_by_prompt: keep the pairs of one prompt together when shuffling.
        layout: how pairs are laid out for the forward (:class:`dpo.data.batch.Layout`); ``auto``
            lets :func:`dpo.models.forward.choose_layout` pick.
        cache_dir: folder of the tokenized cache, shared by a sweep's jobs; None: no cache.
        batch_size: pairs per optimizer step over all devices and accumulation (the paper: 64).
        micro_batch_size: pairs per device per forward; accumulation = batch_size / (micro x world).
        eval_batch_size: pairs per device per validation step.
        max_length: most tokens in prompt + response (official DPO repo: 512); at most the model's
            positions.
        max_prompt_length: prompt tokens kept when a pair is too long, < max_length (official: 256).
        truncation_side: which end of an over-long prompt is kept.
        shuffle: shuffle training pairs each epoch (seeded by the run's seed).
        num_workers: DataLoader workers.
        response: sampling defaults for this data set's responses.
    """

    source: SourceSpec = MISSING
    on_bad_row: OnBadRow = OnBadRow.error
    group_by_prompt: bool = False
    layout: Layout = Layout.auto
    cache_dir: str | None = "${paths.cache_dir}/tokenized"
    batch_size: int = 64
    micro_batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 512
    max_prompt_length: int = 256
    truncation_side: TruncationSide = TruncationSide.keep_end
    shuffle: bool = True
    num_workers: int = 0
    response: ResponseSpec = field(default_factory=ResponseSpec)

    def __post_init__(self) -> None:
        """Every out-of-range setting at once, by key (their cross-checks with the world size and the
        model's positions are :func:`dpo.config.validate.validate`'s)."""
        max_rows = getattr(self.source, "max_rows", None)
        rules = [(key, getattr(self, key), ok, rule) for key, ok, rule in (
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("max_length", self.max_length >= 2, ">= 2 (a prompt token and a response token)"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
        )] + [("source.max_rows", max_rows, max_rows is None or max_rows >= 1, ">= 1 or null (all rows)")]  # fmt: skip
        lengths_ok = 0 < self.max_prompt_length < self.max_length
        refuse(rules, None if lengths_ok else f"need 0 < data.max_prompt_length ({self.max_prompt_length}) < "
               f"data.max_length ({self.max_length})", prefix="data.")  # fmt: skip


class TokenizedDataset(Dataset[TokenizedPair]):
    """A list of tokenized rows with the prompt group of each (rows sharing a prompt share a group)."""

    def __init__(self, items: list[TokenizedPair], groups: list[int]) -> None:
        self.items = items
        self.groups = groups

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TokenizedPair:
        """Row ``i`` with its index; ``-1 - i`` serves row ``i`` as a stand-in (index -1, counts for nothing)."""
        return replace(self.items[i], index=i) if i >= 0 else replace(self.items[-1 - i], index=-1)


class PreferenceDataModule(LightningDataModule):
    """Reads, validates, tokenizes and caches a preference source; serves batches in one layout.

    Reading and tokenization run in :meth:`prepare_data` (once per node, under Lightning) and,
    through the cache, in :meth:`setup`; the entry point calls ``setup`` before any model loads
    so bad data fails fast. Both are idempotent.

    Args:
        tokenizer: tokenizer of the policy.
        config: the ``conf/data`` config; its ``micro_batch_size`` is the per-device batch.
        pairs: serve chosen and rejected (DPO) or chosen only (SFT).
        prompts: serve prompts only, each distinct training prompt once per epoch
            (:func:`dpo.data.collate.collate_prompts`; PPO samples its own responses).
        layout: the batch layout (:func:`dpo.models.forward.choose_layout` decides it once, before this is
            built); SFT rows always come in the separate layout.
        seed: seed of the training shuffle.
        unpaired: serve KTO's rows (:mod:`dpo.data.unpaired`): labelled completions (pairs unpaired),
            each with a mismatched completion from its chunk of ``batch_size`` rows, laid out as pairs.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: DataConfig, *, pairs: bool, layout: Layout, seed: int = 0,
        prompts: bool = False, unpaired: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if layout == Layout.auto:
            raise ValueError("the datamodule needs a decided layout, not auto (dpo.models.forward.choose_layout)")
        self.tokenizer = tokenizer
        self.config = config
        self.source = config.source
        self.lengths = (config.max_length, config.max_prompt_length, config.truncation_side)
        self.pairs = (pairs or unpaired) and not prompts
        self.prompts, self.unpaired = prompts, unpaired
        self.seed = seed
        self.datasets: dict[str, TokenizedDataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.cache_hits: dict[str, bool] = {}
        self.pad_id = pad_id_of(tokenizer)
        self._layout = Layout(layout)

    @property
    def layout(self) -> Layout:
        """The batch layout, fixed at construction."""
        return self._layout

    @property
    def pair_collate(self) -> Callable[[list[TokenizedPair]], ScoredBatch]:
        """Batches of pairs in the configured layout (also used to precompute reference log-probs)."""
        if self.layout == Layout.separate:
            return partial(collate, pad_id=self.pad_id, pairs=True)
        return partial(pack_pairs, pad_id=self.pad_id, padding_free=self.layout == Layout.padding_free)

    @property
    def collate_fn(self) -> Callable[[list[TokenizedPair]], ScoredBatch]:
        """The training and validation batches: pairs in the layout, chosen rows for SFT, or prompts."""
        if self.prompts:
            return collate_prompts
        return self.pair_collate if self.pairs else partial(collate, pad_id=self.pad_id, pairs=False)

    def content_fingerprint(self, split: str) -> str:
        """A fingerprint of a split's tokenized rows (their ids, in order): what a resumed run must
        still train and validate on (``run.json``; :func:`dpo.runtime.run.check_same_data`)."""
        digest = hashlib.sha256()
        for item in self.datasets[split].items:
            for ids in (item.prompt_ids, item.chosen_ids, item.rejected_ids or []):
                digest.update(len(ids).to_bytes(4, "little") + array("q", ids).tobytes())
            if item.label is not None:  # KTO's rows: a flipped label is other data
                digest.update(b"+" if item.label else b"-")
        return f"{len(self.datasets[split])} rows, sha256 {digest.hexdigest()[:16]}"

    def cache_key(self, split: str) -> str:
        """Fingerprint of one tokenized split (see :mod:`dpo.data.cache`)."""
        return cache.fingerprint(
            {
                "source": source_fingerprint(self.source, split),
                "tokenizer": cache.tokenizer_fingerprint(self.tokenizer),
                "lengths": self.lengths,
                "pairs": self.pairs,
                "on_bad_row": self.config.on_bad_row,
                **({"unpaired_chunk": self.config.batch_size} if self.unpaired else {}),
            }
        )

    def _build(self, split: str) -> tuple[list[TokenizedPair], list[int], dict[str, Any]]:
        rows, report = load_rows(self.source, split, on_bad_row=self.config.on_bad_row, tokenizer=self.tokenizer)
        if self.unpaired:
            # chunks of a global batch: the same mismatched completions on any number of ranks
            rows = with_kl_completions(unpaired(rows), self.config.batch_size)
        tokenize = PairTokenizer(self.tokenizer, *self.lengths)
        pairs = [
            tokenize(row if self.pairs else replace(row, rejected=None)) for row in track(rows, f"tokenize {split}")
        ]
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
        key = self.cache_key(split)
        pairs, groups, meta, hit = cache.get_or_build(self.config.cache_dir, key, lambda: self._build(split))
        self.datasets[split] = TokenizedDataset(pairs, groups)
        self.stats[split] = meta
        self.cache_hits[split] = hit

    def attach_reference_logps(self, split: str, values: Any) -> None:
        """Store precomputed reference log-probs, (N, 2) chosen/rejected, on the split's pairs."""
        data = self.datasets[split]
        if len(values) != len(data):
            raise ValueError(f"{len(values)} reference log-probs for {len(data)} {split} pairs")
        data.items = [
            replace(p, ref_logps=(float(c), float(r))) for p, (c, r) in zip(data.items, values.tolist(), strict=True)
        ]

    def prepare_data(self) -> None:
        """Tokenize and cache every split (Lightning runs this once per node)."""
        if self.config.cache_dir is not None:
            for split in SPLITS:
                cache.get_or_build(self.config.cache_dir, self.cache_key(split), lambda s=split: self._build(s))

    def setup(self, stage: str | None = None) -> None:
        """Load every split (from the cache when it holds them); log statistics and samples."""
        if self.datasets:
            return
        for split in SPLITS:
            self._load(split)
            if self.prompts and split == "train":
                self._distinct_prompts(split)
            origin = "cache hit" if self.cache_hits[split] else "tokenized"
            log.info(f"data/{split} ({origin}): {_fmt(self.stats[split])}")
        if self.pairs and not self.unpaired:  # KTO's second completion is another row's, not a rejected one
            for split in SPLITS:
                self._check_pairs_differ(split)
        if (n := len(self.datasets["train"])) < self.config.batch_size:
            raise DataError(
                f"the training split has {n} usable pairs, fewer than one global batch "
                f"(data.batch_size={self.config.batch_size}); lower data.batch_size or add data"
            )
        for text in self.samples(2):
            log.info(text)

    def _check_pairs_differ(self, split: str) -> None:
        """A pair whose chosen and rejected tokens are identical (as given, or once cut to
        ``data.max_length``) teaches a preference loss nothing: every such split is refused, a few
        such pairs are counted in a warning."""
        items = self.datasets[split].items
        same = [i for i, p in enumerate(items) if p.chosen_ids == p.rejected_ids]
        where = self.source.splits.get(split) if self.source.path is None else f"{self.source.path} [{split}]"
        if same and len(same) == len(items):
            raise DataError(
                f"{where}: every pair of the {split} split has the same chosen and rejected response (after "
                f"tokenization and truncation to data.max_length={self.config.max_length}): a preference loss "
                "learns nothing from it; check which fields hold the chosen and rejected responses"
            )
        if same:
            log.warning(f"{where}: {len(same)} of {len(items)} {split} pairs have the same chosen and rejected "
                        f"tokens (e.g. pairs {same[:5]}); they add no preference signal")  # fmt: skip

    def _distinct_prompts(self, split: str) -> None:
        """Keep one row per distinct prompt (its first), so each prompt is drawn once per epoch."""
        data = self.datasets[split]
        first: dict[int, int] = {}
        for i, g in enumerate(data.groups):
            first.setdefault(g, i)
        keep = sorted(first.values())
        self.datasets[split] = TokenizedDataset([data.items[i] for i in keep], list(range(len(keep))))
        self.stats[split] = {**self.stats[split], "pairs": len(keep)}

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
        trainer = self.trainer
        sampler = GlobalBatchSampler(
            data.groups,
            micro=self.config.micro_batch_size,
            world=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            shuffle=self.config.shuffle,
            group_by_prompt=self.config.group_by_prompt,
            seed=self.seed,
        )
        if trainer is not None:
            # Resuming mid-epoch: skip the micro-batches the checkpointed run already trained on.
            # `processed` counts them (a checkpoint written in on_train_batch_end has not yet
            # marked its batch `completed`); at an epoch's end there is nothing to skip.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < len(sampler) // self.config.micro_batch_size:
                sampler.skip_batches = done
        return DataLoader(
            data, batch_size=self.config.micro_batch_size, sampler=sampler, collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """Contiguous shards of the held-out pairs, one per rank, each pair once; every rank gets the
        same number of batches (stand-in batches that count for nothing pad the shorter shards)."""
        return self._shards("val", self.config.eval_batch_size, self.collate_fn)

    def reference_dataloaders(self, batch_size: int) -> dict[str, DataLoader]:
        """Every pair of every split, sharded over ranks as :meth:`val_dataloader`, in the training
        layout: the reference pass of ``reference=precomputed``."""
        return {split: self._shards(split, batch_size, self.pair_collate) for split in SPLITS}

    def _shards(self, split: str, batch_size: int, collate_fn: Callable) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ShardBatches(len(self.datasets[split]), batch_size, world, rank)
        return DataLoader(
            self.datasets[split], batch_sampler=sampler, collate_fn=collate_fn, num_workers=self.config.num_workers
        )


def _fmt(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
