"""Training-time callbacks: completions sampled from the policy on held-out prompts, and the
ground-truth reward and sequence KL of those completions (the IMDB experiment's evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from dpo.data.collate import pad_id_of
from dpo.log import get_logger
from dpo.sampling import GenerationConfig, completion_batch, completion_kl, generate

log = get_logger(__name__)


def optimizer_step_ended_every(trainer: pl.Trainer, batch_idx: int, every: int) -> bool:
    """Whether batch ``batch_idx`` closed an optimizer step whose number is a multiple of ``every``.

    Call from ``on_train_batch_end`` (after the step, so ``global_step`` is already counted);
    ``every=0`` never fires. With accumulation only the last micro-batch of a step counts.
    """
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return bool(every) and stepped and trainer.global_step % every == 0


def rank_share(items: list[Any], world: int, rank: int) -> list[tuple[int, Any]]:
    """This rank's ``(index, item)`` share; every rank gets as many (the list wraps around), so
    under FSDP all ranks run the same number of forwards."""
    share = -(-len(items) // world)
    return [(i, items[i % len(items)]) for i in range(rank * share, (rank + 1) * share)]


def gather_rows(rows: list[dict[str, Any]], world: int, rank: int, n: int) -> list[dict[str, Any]] | None:
    """All ranks' ``rows`` on rank 0, one per ``index`` below ``n`` (the wrapped-around extras
    dropped), in index order; None on the other ranks."""
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return None
    return sorted({r["index"]: r for r in rows if r["index"] < n}.values(), key=lambda r: r["index"])


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
        self.gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
        mine = rank_share(prompts, world, rank)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1_000_003 * rank + step)  # distinct streams per rank
            completions = generate(
                pl_module.policy, [p for _, p in mine], self.gen, pad_id_of(tokenizer), tokenizer.eos_token_id,
                batch_size=len(mine), synced_gpus=world > 1,
            )  # fmt: skip
        rows = [
            {"index": i, "prompt": tokenizer.decode(p), "completion": tokenizer.decode(c, skip_special_tokens=True)}
            for (i, p), c in zip(mine, completions, strict=True)
        ]
        rows = gather_rows(rows, world, rank, len(prompts))
        if rows is None:
            return None
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


class RewardKLEval(pl.Callback):
    """Ground-truth reward and KL(policy || reference) of completions sampled on held-out prompts.

    At the start of training (step 0), every ``every_n_steps`` optimizer steps and at the end,
    the policy samples ``samples_per_prompt`` completions for each of the first ``n_prompts``
    distinct held-out prompts. For each completion it computes the reward (a
    :mod:`dpo.rewards` function of prompt + completion), the exact sequence-level KL (sum over
    the generated tokens of the full-vocabulary KL, :func:`dpo.sampling.completion_kl`) and the
    Monte-Carlo estimate ``log pi(y) - log pi_ref(y)``. Means are logged as ``eval/reward``,
    ``eval/kl`` and ``eval/kl_mc`` to every logger and appended to ``<dirpath>/eval.jsonl``
    (one row per evaluation); the samples go to ``<dirpath>/step<N>.jsonl``. Ranks share the
    prompts (equal shares, ``synced_gpus``), so it runs under DDP and FSDP2.

    Args:
        dirpath: output folder.
        reward: a ``conf/reward`` config (``name`` plus parameters).
        every_n_steps: evaluation period in optimizer steps; 0: only at start and end.
        n_prompts: held-out prompts evaluated.
        samples_per_prompt: completions per prompt.
        generation: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``.
        batch_size: sequences per generate / KL forward.
        include_prompt: score prompt + completion (True) or the completion alone.
        at_start: evaluate before the first step too.
        seed: sampling seed (the same prompts and seed at every evaluation).
    """

    def __init__(
        self,
        dirpath: str,
        reward: dict[str, Any],
        every_n_steps: int = 0,
        n_prompts: int = 64,
        samples_per_prompt: int = 1,
        generation: dict[str, Any] | None = None,
        batch_size: int = 16,
        include_prompt: bool = True,
        at_start: bool = True,
        seed: int = 0,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.reward_cfg = dict(reward)
        self.every_n_steps = every_n_steps
        self.n_prompts = n_prompts
        self.samples_per_prompt = samples_per_prompt
        self.gen = GenerationConfig(**(generation or {}))
        self.gen.kwargs()  # checks the settings now, not after training
        self.batch_size = batch_size
        self.include_prompt = include_prompt
        self.at_start = at_start
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self.reference: torch.nn.Module | None = None  # set by dpo.train when the module has no live reference
        self._reward = None
        self._done: set[int] = set()

    def build_reward(self) -> None:
        """Build the reward function now (``dpo.train`` calls this before any weights load, so a
        bad reward config or an unreachable classifier fails first)."""
        if self._reward is None:
            from dpo.rewards import build_reward

            params = dict(self.reward_cfg)
            self._reward = build_reward(params.pop("name"), **params)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if optimizer_step_ended_every(trainer, batch_idx, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.evaluate(trainer, pl_module)

    def _prompts(self, trainer: pl.Trainer) -> list[list[int]]:
        seen: dict[tuple[int, ...], None] = {}
        for item in trainer.datamodule.datasets["val"].items:
            seen.setdefault(tuple(item.prompt_ids), None)
            if len(seen) == self.n_prompts:
                break
        return [list(p) for p in seen]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, float] | None:
        """Sample, score and measure the KL; returns the means on rank 0 (None elsewhere)."""
        step = trainer.global_step
        if step in self._done:
            return None
        self._done.add(step)
        reference = pl_module.reference_logits_fn()
        if reference is None and self.reference is not None:  # e.g. Preferred-FT: a frozen initial copy
            frozen = self.reference.to(pl_module.device).eval()

            def reference(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return frozen(input_ids=ids, attention_mask=mask).logits

        if reference is None:
            log.warning("eval: no live reference (reference=precomputed or none); the KL is not measured")
        self.build_reward()
        tokenizer = trainer.datamodule.tokenizer
        prompts = [p for p in self._prompts(trainer) for _ in range(self.samples_per_prompt)]
        world, rank = trainer.world_size, trainer.global_rank
        mine = rank_share(prompts, world, rank)
        pad_id, device = pad_id_of(tokenizer), pl_module.device
        policy = pl_module.policy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1_000_003 * rank)
            completions = generate(
                policy, [p for _, p in mine], self.gen, pad_id, tokenizer.eos_token_id, self.batch_size, world > 1
            )
        rows = []
        was_training = policy.training
        policy.eval()
        for start in range(0, len(mine), self.batch_size):
            part = mine[start : start + self.batch_size]
            comps = completions[start : start + self.batch_size]
            batch = completion_batch([p for _, p in part], [c if c else [pad_id] for c in comps], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            if reference is not None:
                kl, kl_mc, _, n_tok = (x.tolist() for x in completion_kl(policy, reference, batch))
            else:
                kl = kl_mc = [float("nan")] * len(part)
                n_tok = [float(len(c)) for c in comps]
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in comps]
            prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for _, p in part]
            scores = self._reward(
                [pt + t if self.include_prompt else t for pt, t in zip(prompt_texts, texts, strict=True)]
            )
            rows += [
                {"index": i, "prompt": pt, "completion": t, "reward": r, "kl": k, "kl_mc": m, "tokens": n}
                for (i, _), pt, t, r, k, m, n in zip(part, prompt_texts, texts, scores, kl, kl_mc, n_tok, strict=True)
            ]
        policy.train(was_training)
        rows = gather_rows(rows, world, rank, len(prompts))
        if rows is None:
            return None
        n = len(rows)
        result = {
            "step": step,
            "reward": sum(r["reward"] for r in rows) / n,
            "kl": sum(r["kl"] for r in rows) / n,
            "kl_mc": sum(r["kl_mc"] for r in rows) / n,
            "tokens": sum(r["tokens"] for r in rows) / n,
            "n": n,
        }
        self.history.append(result)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with (self.dirpath / f"step{step:06d}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with (self.dirpath / "eval.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        metrics = {f"eval/{k}": v for k, v in result.items() if k in ("reward", "kl", "kl_mc", "tokens")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info(f"eval step {step}: reward {result['reward']:.4f}, KL {result['kl']:.3f} (MC {result['kl_mc']:.3f})")
        return result
