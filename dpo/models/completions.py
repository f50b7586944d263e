"""What is done with sampled completions: their text, their scores, their KL to the reference.

One owner for each step that the evaluation callback, the samples callback, PPO's rollouts,
``dpo-sample`` and ``dpo-eval`` share. Shapes: ``N`` sequences, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpo.data.batch import IGNORE_INDEX
from dpo.maths.logprobs import sequence_kl, sequence_logps
from dpo.models.load import max_positions
from dpo.models.sampling import GenerationConfig, cut_at_stop, fits_context, generate


def completion_texts(
    tokenizer: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> tuple[list[str], list[str]]:
    """The text of each prompt and the text its completion adds to it (special tokens skipped).

    The completion's text is ``decode(prompt + completion)`` less ``decode(prompt)``: decoding the
    completion alone drops the space a SentencePiece tokenizer (Llama, Mistral) writes into the first
    token, and splits a character whose UTF-8 bytes straddle the two parts. Where ``decode(prompt)``
    is not a prefix of the whole (a character split at the boundary), the completion is decoded
    alone. So ``prompt_text + completion_text`` is the text every reward scores, and the text a
    pipeline stage writes is the text the training loop saw.
    """
    prompt_texts, texts = [], []
    for p, c in zip(prompts, completions, strict=True):
        head = tokenizer.decode(list(p), skip_special_tokens=True)
        whole = tokenizer.decode(list(p) + list(c), skip_special_tokens=True)
        prompt_texts.append(head)
        texts.append(
            whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(c), skip_special_tokens=True)
        )
    return prompt_texts, texts


def score_texts(
    reward: Callable[[list[str]], list[float]], prompt_texts: Sequence[str], texts: Sequence[str], include_prompt: bool
) -> list[float]:
    """The reward of each completion: of ``prompt + completion`` (``include_prompt``) or the completion alone."""
    return list(reward([pt + t if include_prompt else t for pt, t in zip(prompt_texts, texts, strict=True)]))


@dataclass
class SampledTexts:
    """Completions of text prompts.

    Attributes:
        texts: per prompt, its ``n`` completions (cut at the stop strings); None for a skipped prompt.
        skipped: how many prompts were skipped because prompt + ``max_new_tokens`` exceed the context.
    """

    texts: list[list[str] | None]
    skipped: int


def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    gen: GenerationConfig,
    *,
    n: int = 1,
    batch_size: int = 16,
    progress: str | None = None,
) -> SampledTexts:
    """``n`` completions of each text prompt, as text, cut at the stop strings; the caller seeds.

    The prompt is tokenized whole (never cut); one that does not fit the model's context with
    ``gen.max_new_tokens`` more tokens is skipped and counted. Shared by ``dpo-sample`` and ``dpo-eval``.
    """
    context = max_positions(model.config)
    ids = [tokenizer(t)["input_ids"] for t in prompts]
    keep = [i for i, p in enumerate(ids) if fits_context(len(p), gen.max_new_tokens, context)]
    repeated = [ids[i] for i in keep for _ in range(n)]  # n consecutive samples per prompt
    tokens = generate(model, repeated, gen, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size,
                      progress=progress, tokenizer=tokenizer) if repeated else []  # fmt: skip
    decoded = [cut_at_stop(t, gen.stop) for t in completion_texts(tokenizer, repeated, tokens)[1]]
    texts: list[list[str] | None] = [None] * len(prompts)
    for j, i in enumerate(keep):
        texts[i] = decoded[j * n : (j + 1) * n]
    return SampledTexts(texts, len(prompts) - len(keep))


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``prompt + completion`` rows with labels on the completion tokens only."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, len(p) : len(r)] = ids[i, len(p) : len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def completion_kl(policy: nn.Module, reference: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sequence-level KL(policy || reference) of sampled completions, exact and Monte Carlo.

    The exact value sums, over the completion's tokens, the full-vocabulary KL of the next-token
    distributions (:func:`dpo.maths.logprobs.sequence_kl`); the Monte-Carlo estimate is
    ``log pi(y|x) - log pi_ref(y|x)`` of the sampled ``y``. Both have the sequence KL as their
    expectation over ``y ~ pi``; the exact one has far less variance.

    Args:
        policy: the policy.
        reference: a callable ``(input_ids, attention_mask) -> logits`` of the reference.
        batch: from :func:`completion_batch`, on the policy's device.

    Returns:
        ``(kl_exact, kl_mc, policy_logps, n_tokens)``, each (N,).
    """
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
    ref_logits = reference(batch["input_ids"], batch["attention_mask"])
    kl = sequence_kl(logits, ref_logits, batch["labels"])
    pol, ref = sequence_logps(logits, batch["labels"]), sequence_logps(ref_logits, batch["labels"])
    return kl, pol.sum - ref.sum, pol.sum, pol.n_tokens
