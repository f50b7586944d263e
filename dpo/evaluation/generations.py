"""Training-time observers: completions sampled from the policy on held-out prompts.

Evaluations that score what the policy does (reward, KL, win rates) live in :mod:`dpo.evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from dpo.models.completions import completion_texts
from dpo.models.sampling import GenerationConfig, check_counts, sample_rank_share
from dpo.runtime.distributed import gather_rows
from dpo.runtime.io import write_jsonl
from dpo.systems.base import optimizer_step_ended


class GenerationSamples(pl.Callback):
    """Sample completions of the first held-out prompts every ``every_n_steps`` steps and at the end.

    Each rank generates for its share of the prompts; under FSDP every rank must take part in
    every forward, so all ranks get the same number of prompts (the list is padded by repeating)
    and generate with ``synced_gpus`` (no rank stops early). Rank 0 writes
    ``<dirpath>/step<N>.jsonl`` and logs a wandb table when a wandb logger is attached.

    Args:
        dirpath: folder of the sample files.
        every_n_steps: sampling period in optimizer steps; 0 samples only at the end of training.
        n_prompts: how many held-out prompts.
        max_new_tokens: tokens generated per prompt.
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling mass.
        seed: seed of the sampling RNG (training's RNG state is left untouched).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        n_prompts: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_counts(every_n_steps=(every_n_steps, 0), n_prompts=(n_prompts, 1))
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.n_prompts = n_prompts
        self.gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.gen.kwargs()  # checks the settings now, not after training
        self.seed = seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if optimizer_step_ended(trainer, batch_idx, self.every_n_steps):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module: Any) -> list[dict[str, str]] | None:
        """Generate, gather to rank 0, write; returns the rows on rank 0 (None elsewhere)."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        datamodule = trainer.datamodule
        tokenizer = datamodule.tokenizer
        prompts = [p.prompt_ids for p in datamodule.datasets["val"].items[: self.n_prompts]]
        world, rank = trainer.world_size, trainer.global_rank
        mine, completions = sample_rank_share(pl_module.policy, prompts, self.gen, tokenizer, world, rank,
                                              self.seed + step, batch_size=-(-len(prompts) // world))  # fmt: skip
        prompt_texts, texts = completion_texts(tokenizer, [p for _, p in mine], completions)
        rows = [
            {"index": i, "prompt": pt, "completion": t} for (i, _), pt, t in zip(mine, prompt_texts, texts, strict=True)
        ]
        rows = gather_rows(rows, world, rank, len(prompts))
        if rows is None:
            return None
        write_jsonl(self.dirpath / f"step{step:06d}.jsonl", ({"step": step, **row} for row in rows))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_text(
                    key="samples",
                    columns=["step", "prompt", "completion"],
                    data=[[step, r["prompt"], r["completion"]] for r in rows],
                )
        return rows
