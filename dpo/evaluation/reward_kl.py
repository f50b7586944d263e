"""Ground-truth reward and exact sequence KL of completions sampled during training (the IMDB
experiment's evaluation, and the frontier's points)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dpo.data.collate import pad_id_of
from dpo.data.tokenize import PairTokenizer
from dpo.models.completions import completion_batch, completion_kl, completion_texts, score_texts
from dpo.models.sampling import GenerationConfig, check_counts, sample_rank_share
from dpo.report.summary import change
from dpo.report.wandb_logging import log_frontier, log_samples
from dpo.rewards.registry import reward_from_config
from dpo.runtime.distributed import gather_rows
from dpo.runtime.io import DataError, append_jsonl, read_jsonl, write_jsonl
from dpo.runtime.log import get_logger
from dpo.systems.base import optimizer_step_ended

log = get_logger(__name__)
SUMMARY = (
    ("reward", "ground-truth reward"),
    ("kl", "KL(policy||ref), exact"),
    ("kl_mc", "KL, Monte-Carlo estimate"),
    ("tokens", "completion tokens"),
)


class RewardKLEval(pl.Callback):
    """Ground-truth reward and KL(policy || reference) of completions sampled on held-out prompts.

    At the start of training (step 0), every ``every_n_steps`` optimizer steps and at the end,
    the policy samples ``samples_per_prompt`` completions for each of the first ``n_prompts``
    distinct held-out prompts. For each completion it computes the reward (a
    :mod:`dpo.rewards.registry` function of prompt + completion), the exact sequence-level KL (sum over
    the generated tokens of the full-vocabulary KL, :func:`dpo.models.sampling.completion_kl`) and the
    Monte-Carlo estimate ``log pi(y) - log pi_ref(y)``. Means are logged as ``eval/reward``,
    ``eval/kl`` and ``eval/kl_mc`` to every logger and appended to ``<dirpath>/eval.jsonl``
    (one row per evaluation); the samples go to ``<dirpath>/step<N>.jsonl``. Ranks share the
    prompts (equal shares, ``synced_gpus``), so it runs under DDP and FSDP2.

    The KL is measured against what the system's reference gives for sampled sequences
    (:meth:`dpo.systems.reference.Reference.for_evaluation`): the reference itself, a frozen copy of the
    starting policy for reference-free losses, or nothing for precomputed log-probs. The reward is
    built when the callback is, before any policy weights load, so a bad reward config fails first.

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
        prompt_source: where the prompts come from instead of the held-out pairs: a data source
            config as ``data.source`` (e.g. IMDB's test split with token prefixes, as the paper's
            authors evaluated), its ``prompt_split`` read when the callback is built (before any
            weights load); ``n_prompts`` distinct prompts drawn with ``seed`` (a split may be
            sorted: IMDB's test split holds its negative reviews first), tokenized as the pairs'.
        prompt_split: the split of ``prompt_source`` to read.
        tokenizer: the run's tokenizer (``dpo-train`` passes it): IMDB's token prefixes are cut with it.
        log_samples: also send each evaluation's samples to wandb as a table (the run folder
            always has them); the frontier table goes to wandb whenever a WandbLogger is on.
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
        log_samples: bool = False,
        prompt_source: dict[str, Any] | None = None,
        prompt_split: str = "test",
        tokenizer: Any = None,
    ) -> None:
        check_counts(every_n_steps=(every_n_steps, 0), n_prompts=(n_prompts, 1),
                     samples_per_prompt=(samples_per_prompt, 1), batch_size=(batch_size, 1))  # fmt: skip
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.n_prompts = n_prompts
        self.samples_per_prompt = samples_per_prompt
        self.gen = GenerationConfig(**(generation or {}))
        self.gen.kwargs()  # checks the settings now, not after training
        self.batch_size = batch_size
        self.include_prompt = include_prompt
        self.at_start = at_start
        self.seed = seed
        self.log_samples = log_samples
        self.history: list[dict[str, float]] = []
        self.reward_name = reward["name"]
        self.reward = reward_from_config(reward)
        self.prompt_texts = None
        if prompt_source is not None:
            self.prompt_texts = source_prompts(prompt_source, prompt_split, n_prompts, tokenizer, seed)
        self._reference: Any = None  # what samples are measured against (set up once, in setup)
        self._set_up = False
        self._done: set[int] = set()

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if hasattr(self.reward, "to"):  # a reward model runs on this rank's own device
            self.reward.to(trainer.strategy.root_device)
        # Before any checkpoint is restored: a snapshot taken here is the starting policy.
        if not self._set_up:
            self._set_up = True
            self._reference = pl_module.reference.for_evaluation(pl_module.policy)
            if self._reference is None:
                log.warning(f"eval: reference={pl_module.reference.kind} can't score samples; the KL is not measured")

    def report(self) -> list[str]:
        """Lines for the run summary: the first and last evaluation."""
        if len(self.history) < 2:
            return []
        first, last = self.history[0], self.history[-1]
        head = (f"held-out generations ({last['n']} samples, reward {self.reward_name}), "
                f"step {first['step']} -> {last['step']}:")  # fmt: skip
        return [head] + [change(label, first[key], last[key]) for key, label in SUMMARY]

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if optimizer_step_ended(trainer, batch_idx, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.evaluate(trainer, pl_module)

    def _prompts(self, trainer: pl.Trainer) -> list[list[int]]:
        if self.prompt_texts is not None:
            tokenize = PairTokenizer(trainer.datamodule.tokenizer, *trainer.datamodule.lengths)
            return [tokenize.prompt_ids(text) for text in self.prompt_texts]
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
        policy = pl_module.policy
        reference = None
        if self._reference is not None:
            ref = self._reference.to(pl_module.device)

            def reference(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return ref.logits(ids, mask, policy)

        tokenizer = trainer.datamodule.tokenizer
        prompts = [p for p in self._prompts(trainer) for _ in range(self.samples_per_prompt)]
        world, rank = trainer.world_size, trainer.global_rank
        mine, completions = sample_rank_share(policy, prompts, self.gen, tokenizer, world, rank, self.seed,
                                              self.batch_size)  # fmt: skip
        rows = self.measure(policy, reference, tokenizer, mine, completions, pl_module.device)
        rows = gather_rows(rows, world, rank, len(prompts))
        if rows is None:
            return None
        result = self.record(trainer, step, rows)
        log.info(f"eval step {step}: reward {result['reward']:.4f}, KL {result['kl']:.3f} (MC {result['kl_mc']:.3f})")
        return result

    @torch.no_grad()
    def measure(self, policy: Any, reference: Any, tokenizer: Any, mine: list[tuple[int, list[int]]],
                completions: list[list[int]], device: torch.device) -> list[dict[str, Any]]:  # fmt: skip
        """One row per (index, prompt) of this rank with its completion: text, reward, exact and
        Monte-Carlo KL (NaN without a reference) and token count."""
        rows, pad_id = [], pad_id_of(tokenizer)
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
            prompt_texts, texts = completion_texts(tokenizer, [p for _, p in part], comps)
            scores = score_texts(self.reward, prompt_texts, texts, self.include_prompt)
            rows += [
                {"index": i, "prompt": pt, "completion": t, "reward": r, "kl": k, "kl_mc": m, "tokens": n}
                for (i, _), pt, t, r, k, m, n in zip(part, prompt_texts, texts, scores, kl, kl_mc, n_tok, strict=True)
            ]
        policy.train(was_training)
        return rows

    def record(self, trainer: pl.Trainer, step: int, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Rank 0: the means of every rank's rows, into ``eval.jsonl``, the loggers and the frontier."""
        n = len(rows)
        result = {"step": step, **{k: sum(r[k] for r in rows) / n for k in ("reward", "kl", "kl_mc", "tokens")}, "n": n}
        self.history.append(result)
        write_jsonl(self.dirpath / f"step{step:06d}.jsonl", rows)
        append_jsonl(self.dirpath / "eval.jsonl", result)
        metrics = {f"eval/{k}": v for k, v in result.items() if k in ("reward", "kl", "kl_mc", "tokens")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # every evaluation of the run, those before a resume included (eval.jsonl is appended to)
        log_frontier(trainer, read_jsonl(self.dirpath / "eval.jsonl", {"step": int, "kl": (int, float)}))
        if self.log_samples:
            log_samples(trainer, step, rows)
        return result


def source_prompts(source: dict[str, Any], split: str, n: int, tokenizer: Any, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of ``split`` of a data ``source`` config (``data.source``'s keys), drawn
    at random with ``seed`` (in file order when the split has no more), read with the run's
    tokenizer (IMDB's token prefixes are cut with it)."""
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec

    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    try:
        spec = SourceSpec(**source)
    except TypeError as e:
        raise ValueError(f"prompt_source: {e}") from None
    if split not in spec.splits:
        raise DataError(f"callbacks.reward_eval.prompt_split={split!r}: prompt_source.splits has {sorted(spec.splits)}")
    rows, _ = load_rows(spec, split, tokenizer=tokenizer)
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    if len(prompts) > n:
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), n))]
    if not prompts:
        raise DataError(f"callbacks.reward_eval.prompt_source: split {split!r} of {spec.path or spec.splits} "
                        "has no prompts")  # fmt: skip
    return prompts
