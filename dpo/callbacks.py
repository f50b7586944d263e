"""Training-time callbacks: completions sampled from the policy on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from dpo.data.collate import pad_id_of
from dpo.log import get_logger

log = get_logger(__name__)


def optimizer_step_ended_every(trainer: pl.Trainer, batch_idx: int, every: int) -> bool:
    """Whether batch ``batch_idx`` closed an optimizer step whose number is a multiple of ``every``.

    Call from ``on_train_batch_end`` (after the step, so ``global_step`` is already counted);
    ``every=0`` never fires. With accumulation only the last micro-batch of a step counts.
    """
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return bool(every) and stepped and trainer.global_step % every == 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and attention mask, padded on the left so generation continues every prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


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
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.n_prompts = n_prompts
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if optimizer_step_ended_every(trainer, batch_idx, self.every_n_steps):
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
        share = -(-len(prompts) // world)
        mine = [(i, prompts[i % len(prompts)]) for i in range(rank * share, (rank + 1) * share)]
        pad_id = pad_id_of(tokenizer)
        ids, mask = left_pad([p for _, p in mine], pad_id)
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1_000_003 * rank + step)  # distinct streams per rank
            out = policy.generate(
                input_ids=ids.to(pl_module.device),
                attention_mask=mask.to(pl_module.device),
                do_sample=self.temperature > 0,
                temperature=self.temperature if self.temperature > 0 else None,
                top_p=self.top_p if self.temperature > 0 else None,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad_id,
                synced_gpus=world > 1,
            )
        policy.train(was_training)
        rows = [
            {
                "index": i,
                "prompt": tokenizer.decode(p),
                "completion": tokenizer.decode(o[ids.shape[1] :], skip_special_tokens=True),
            }
            for (i, p), o in zip(mine, out.tolist(), strict=True)
        ]
        if world > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if rank != 0:
            return None
        rows = sorted({r["index"]: r for r in rows if r["index"] < len(prompts)}.values(), key=lambda r: r["index"])
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with (self.dirpath / f"step{step:06d}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_text(
                    key="samples",
                    columns=["step", "prompt", "completion"],
                    data=[[step, r["prompt"], r["completion"]] for r in rows],
                )
        return rows
