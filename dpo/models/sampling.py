"""Sampling completions from a causal LM: the settings, the decode loop, a rank's share of prompts.

What is done with the sampled tokens (text, scores, KL) is :mod:`dpo.models.completions`.

Shapes: ``N`` sequences, ``P`` prompt tokens (left-padded), ``L`` generated tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dpo.data.collate import pad_id_of
from dpo.models.forward import takes_logits_to_keep
from dpo.models.packed import packed_linears
from dpo.runtime.checks import refuse
from dpo.runtime.distributed import rank_share
from dpo.runtime.progress import track


@dataclass
class GenerationConfig:
    """How completions are sampled: the typed ``generation`` node of ``dpo-sample`` and of PPO's
    rollouts (``system.generation``), each with its own defaults for the keys it sets.

    Attributes:
        max_new_tokens: most tokens per completion.
        temperature: softmax temperature; 0 decodes greedily.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: nucleus mass; 1.0 keeps all.
        stop: strings that end a completion: generation stops once one appears and the text is
            cut before it (:func:`cut_at_stop`). Token ids stop only at EOS.
    """

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate``."""
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"generation.stop must be non-empty strings, got {list(self.stop)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:  # -1 used to sample greedily
            raise ValueError(
                f"generation needs temperature >= 0 (0: greedy), top_k >= 0 (0: off) and 0 < top_p <= 1, got "
                f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}"
            )
        stop = {"stop_strings": list(self.stop)} if self.stop else {}
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **stop}
        return {
            "do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None,
            "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, **stop,
        }  # fmt: skip


@dataclass
class SweepGeneration:
    """``dpo-eval``'s ``generation``: :class:`GenerationConfig` less the temperature, which
    ``temperatures`` sweeps (so ``generation.temperature=...`` is refused, not ignored). The defaults
    are :class:`GenerationConfig`'s; ``conf/eval.yaml`` takes ``max_new_tokens`` and ``stop`` from the
    data's ``response``."""

    max_new_tokens: int = GenerationConfig.max_new_tokens
    top_k: int = GenerationConfig.top_k
    top_p: float = GenerationConfig.top_p
    stop: list[str] = field(default_factory=list)

    def at(self, temperature: float) -> GenerationConfig:
        """The sampling settings at one temperature of the sweep."""
        return GenerationConfig(self.max_new_tokens, temperature, self.top_k, self.top_p, list(self.stop))


def check_counts(**counts: tuple[int, int]) -> None:
    """Raise one ``ValueError`` naming every ``key=value`` below its minimum (``key=(value, minimum)``)."""
    refuse((key, value, value >= least, f">= {least}") for key, (value, least) in counts.items())


def generation_problem(generation: Any) -> str | None:
    """What is wrong with sampling settings (a :class:`GenerationConfig` or a mapping of its keys),
    named ``generation...`` (:meth:`GenerationConfig.kwargs`'s checks, or an unknown key); None if nothing."""
    try:
        (generation if isinstance(generation, GenerationConfig) else GenerationConfig(**dict(generation))).kwargs()
    except (TypeError, ValueError) as e:
        return str(e) if str(e).startswith("generation") else f"generation: {e}"
    return None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the ``stop`` strings."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def fits_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> bool:
    """Whether a prompt and its completion fit the model's positions (None: no limit).

    Prompts are never cut to fit: a cut TL;DR post or HH dialogue is a different prompt. Callers
    skip and count the ones that don't fit.
    """
    return context is None or prompt_tokens + max_new_tokens <= context


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(N, P) ids and attention mask, padded on the left so generation continues every prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], eos_id: int | None, pad_id: int) -> list[int]:
    """Generated tokens up to and including the first EOS; trailing padding dropped."""
    out = []
    for t in tokens:
        out.append(t)
        if t == eos_id:
            return out
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


@dataclass
class Completions:
    """What :func:`sample_completions` returns, one entry per prompt.

    Attributes:
        tokens: the generated ids, cut after the first EOS (stop strings still inside: see ``generate``).
        logps: per generated token, ``log pi(token | prefix)`` under the model's own next-token
            distribution (fp32 log-softmax of its logits, before temperature, top-k and top-p), the
            value a forward pass over ``prompt + completion`` gives for that token.
    """

    tokens: list[list[int]]
    logps: list[list[float]]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    gen: GenerationConfig,
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 16,
    synced_gpus: bool = False,
    progress: str | None = None,
    tokenizer: Any = None,
    uniforms: Tensor | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt (repeat a prompt k times for k samples), batched.

    Returns the generated token ids of each prompt, cut after the first EOS. The caller seeds the RNG,
    or gives each prompt its own draws: ``uniforms`` (N, max_new_tokens), the uniform of each
    prompt's every step (:func:`row_uniforms`), so a completion depends on its prompt's draws alone,
    whatever else shares its batch or its rank.
    ``progress`` labels a progress bar (standalone sampling; none inside Lightning's loops).
    With ``gen.stop``, generation of a row ends once a stop string appears (``tokenizer`` required);
    the ids still hold it: decode and :func:`cut_at_stop` (or use :func:`sample_texts`).
    ``synced_gpus``: every rank runs the same number of forward passes (DDP/FSDP; FSDP gathers
    weights inside each), until the last row of every rank is done.
    """
    return sample_completions(model, prompts, gen, pad_id, eos_id, batch_size, synced_gpus, progress, tokenizer,
                              with_logps=False, uniforms=uniforms).tokens


def draw_seed(*parts: int) -> int:
    """A 63-bit seed of integers (the run's seed, step, row, sample): the same on every rank and resume."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def sample_groups(model: nn.Module, prompts: list[list[int]], rows: Sequence[int], k: int, gen: GenerationConfig,
                  tokenizer: Any, seed: int, step: int) -> list[list[list[int]]]:  # fmt: skip
    """``k`` completions of each prompt (one batch), completion j of the prompt at split row r drawn
    from uniforms seeded by (seed, step, r, j): what online DPO, GRPO and RLOO train on, the same
    whatever the batching, the ranks or a resume. An empty completion becomes the EOS (or pad) token."""
    pad_id, eos_id = pad_id_of(tokenizer), tokenizer.eos_token_id
    uniforms = row_uniforms([draw_seed(seed, step, int(r), j) for r in rows for j in range(k)], gen.max_new_tokens)
    flat = generate(model, [p for p in prompts for _ in range(k)], gen, pad_id, eos_id, len(prompts) * k,
                    tokenizer=tokenizer, uniforms=uniforms)  # fmt: skip
    flat = [c or [eos_id if eos_id is not None else pad_id] for c in flat]
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def row_uniforms(seeds: Sequence[int], steps: int) -> Tensor:
    """(N, steps) uniforms, row i drawn from a generator seeded with ``seeds[i]`` alone: the draws of
    :func:`generate` for N prompts that do not depend on batching, ranks or the global RNG (online
    DPO seeds each (step, row, sample) so resumed and distributed runs sample what one process would)."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_rank_share(
    model: nn.Module, prompts: list[list[int]], gen: GenerationConfig, tokenizer: Any, world: int, rank: int,
    seed: int, batch_size: int,
) -> tuple[list[tuple[int, list[int]]], list[list[int]]]:
    """This rank's ``(index, prompt)`` share of ``prompts`` (:func:`dpo.runtime.distributed.rank_share`)
    and one completion of each, drawn from a stream of its own (``seed``, offset per rank) without
    touching the training RNG: what the evaluation and samples callbacks sample from the policy."""
    mine = rank_share(prompts, world, rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003 * rank)  # distinct streams per rank
        completions = generate(model, [p for _, p in mine], gen, pad_id_of(tokenizer), tokenizer.eos_token_id,
                               batch_size, synced_gpus=world > 1)  # fmt: skip
    return mine, completions


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: list[list[int]],
    gen: GenerationConfig,
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 16,
    synced_gpus: bool = False,
    progress: str | None = None,
    tokenizer: Any = None,
    with_logps: bool = True,
    uniforms: Tensor | None = None,
) -> Completions:
    """:func:`generate`, with the log-probability of each generated token (``with_logps=False``:
    empty lists, and no log-softmax per step).

    Our own decode loop over the model's forward and a ``DynamicCache`` (Hugging Face ``generate``
    is the reference it is tested against): a row that ends (EOS or a stop string) leaves the
    batch, so later steps run on the rows still going. What is drawn follows ``generate``'s
    distribution: the same temperature, top-k and top-p warpers, then an inverse-CDF draw
    (:func:`_pick`; greedy decoding gives ``generate``'s tokens, sampled decoding its distribution,
    not its draws). Only the configured sampling applies, never
    defaults stored with the model (``generation_config.json``).
    """
    if gen.stop and tokenizer is None:
        raise ValueError("generation.stop needs the tokenizer")
    kwargs = gen.kwargs()  # validates
    warp = _warpers(gen) if kwargs["do_sample"] else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = Completions([], [])
    starts = range(0, len(prompts), batch_size)
    try:
        with packed_linears(model, min(batch_size, len(prompts))):  # CPU only: dpo.models.packed
            for start in track(starts, progress) if progress else starts:
                ids, mask = left_pad(prompts[start : start + batch_size], pad_id)
                u = None if uniforms is None else uniforms[start : start + batch_size].to(device)
                tokens, logps = _decode(model, ids.to(device), mask.to(device), gen, warp, pad_id, eos_id,
                                        tokenizer, synced_gpus, with_logps, u)  # fmt: skip
                out.tokens += tokens
                out.logps += logps
    finally:
        model.train(was_training)
    return out


def _warpers(gen: GenerationConfig) -> LogitsProcessorList:
    """Hugging Face's sampling warpers for ``gen``, in ``generate``'s order."""
    warpers = LogitsProcessorList()
    if gen.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))
    return warpers


def _more_steps(local: bool, synced: bool, device: torch.device) -> bool:
    """Whether any rank (only this one unless ``synced``) still has rows going."""
    if not synced:
        return local
    flag = torch.tensor([float(local)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _decode(
    model: nn.Module, ids: Tensor, mask: Tensor, gen: GenerationConfig, warp: LogitsProcessorList | None,
    pad_id: int, eos_id: int | None, tokenizer: Any, synced: bool, with_logps: bool = True,
    uniforms: Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
    """Decode one left-padded batch: ``ids``/``mask`` (N, P); returns tokens and log-probs per row.

    ``rows`` maps the cache's rows to the batch's; ``going`` marks which of them still generate
    (a finished row stays only as the one placeholder a synced rank needs to keep stepping).
    """
    n = ids.shape[0]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    keep_last = {"logits_to_keep": 1} if takes_logits_to_keep(inner) else {}
    width = ids.shape[1]
    cache = DynamicCache(config=inner.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P): left padding shifts each row's positions
    # the mask of the whole decode, written in place as tokens arrive; each step passes a view
    mask = torch.cat([mask, mask.new_ones(n, gen.max_new_tokens)], dim=1)  # (N, P + max_new_tokens)
    logits = model(input_ids=ids, attention_mask=mask[:, :width], position_ids=positions, cache=cache,
                   use_cache=True, **keep_last).logits[:, -1].float()  # fmt: skip  # (N, V)
    position = positions[:, -1:]  # (N, 1)
    rows = torch.arange(n, device=ids.device)
    going = torch.ones(n, dtype=torch.bool, device=ids.device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    for step in range(gen.max_new_tokens):
        u = None if uniforms is None else uniforms[:, step]  # (N,)
        picked = _pick(logits, warp, rows, going, n, pad_id, u)  # (R,)
        for r, t in zip(rows[going].tolist(), picked[going].tolist(), strict=True):
            tokens[r].append(t)
        if with_logps:
            chosen_logps = logits.gather(-1, picked[:, None])[:, 0] - torch.logsumexp(logits, -1)  # log-softmax there
            for r, lp in zip(rows[going].tolist(), chosen_logps[going].tolist(), strict=True):
                logps[r].append(lp)
        ended = going & (picked == eos_id) if eos_id is not None else torch.zeros_like(going)
        if gen.stop:
            ended |= torch.tensor([bool(g) and any(s in tokenizer.decode(tokens[r]) for s in gen.stop)
                                   for r, g in zip(rows.tolist(), going.tolist(), strict=True)],
                                  device=going.device)  # fmt: skip
        going &= ~ended
        last = step + 1 == gen.max_new_tokens
        if not _more_steps(bool(going.any()) and not last, synced and not last, ids.device):
            break
        keep = going if going.any() else torch.arange(len(going), device=going.device) == 0  # a synced placeholder
        if not keep.all():
            cache.batch_select_indices(keep.nonzero()[:, 0])
            rows, going, mask, position, picked = rows[keep], going[keep], mask[keep], position[keep], picked[keep]
        position = position + 1
        logits = model(input_ids=picked[:, None], attention_mask=mask[:, : width + step + 1], position_ids=position,
                       cache=cache, use_cache=True, **keep_last).logits[:, -1].float()  # fmt: skip
    return tokens, logps


def _pick(logits: Tensor, warp: LogitsProcessorList | None, rows: Tensor, going: Tensor, n: int, pad_id: int,
          uniforms: Tensor | None = None) -> Tensor:  # fmt: skip
    """Next token of each cache row: greedy without ``warp``, else an inverse-CDF draw from the warped
    softmax: one uniform per row of the batch (``n`` every step, rows that ended included, so a row's
    draws never depend on when the others end), the first token whose cumulative probability exceeds
    it. One ``rand`` and one ``cumsum`` instead of ``torch.multinomial`` (which cost a fifth of a
    batch-64 step on a CPU); the distribution is the same, the draws differ from ``generate``'s.
    ``uniforms`` (n,): the step's draws, given (:func:`row_uniforms`)."""
    if warp is None:
        return logits.argmax(-1)
    warped = warp(None, logits.clone()) if warp else logits  # (R, V); logits stay raw
    # the softmax's numerators exp(x - max) and their running sum; drawing below u * total is drawing
    # from the softmax without dividing by its sum
    weights = torch.sub(warped, warped.amax(-1, keepdim=True)).exp_()
    u = torch.rand(n, device=weights.device, dtype=weights.dtype) if uniforms is None else uniforms
    u = u.to(weights.dtype)[rows]  # (R,) this row's uniform of the step
    cdf = weights.cumsum(-1)  # (R, V)
    total = cdf[:, -1:]
    # below the total: u * total rounds to the total when u is within 2**-24 of 1, which would pass the
    # last token with probability > 0 and land on a masked one
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]
