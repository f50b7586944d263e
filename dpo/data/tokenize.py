"""One tokenization policy for every source.

Prompt and responses are tokenized *separately* and concatenated, so that

* the prompt tokens of the chosen and the rejected row are identical, and
* a response never merges with the end of the prompt (a byte-level BPE would otherwise merge,
  e.g., a trailing space of the prompt with the response's first word).

BOS: added in front of the prompt only when the tokenizer adds one by itself (Llama-style), never
twice. EOS: closes every response exactly once, so the model learns to stop (a chat template that
already ends the turn with the EOS token gets no second one).

Truncation policy, applied per pair with ``max_length`` (prompt + longest response) and
``max_prompt_length`` (< ``max_length``):

1. If the pair is too long, the prompt is cut to ``max_prompt_length`` tokens, keeping its end
   (``keep_end``, the default: the last turn of a dialogue matters most), its start
   (``keep_start``) or both ends, the middle cut (``keep_ends``: half the budget from each end; a
   TL;DR prompt keeps its SUBREDDIT/TITLE head and its ``TL;DR:`` cue). A leading BOS is kept.
2. If it is still too long, each response is cut to ``max_length - len(prompt)`` tokens, keeping
   its start. A cut response loses its EOS: it did not end there.

A response therefore always keeps at least ``max_length - max_prompt_length >= 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from transformers import PreTrainedTokenizerBase

from dpo.data.sources import PreferenceRow
from dpo.runtime.io import DataError


class TruncationSide(str, Enum):
    """Which end of an over-long prompt is kept (``data.truncation_side``)."""

    keep_end = "keep_end"  # the last turn of a dialogue matters most
    keep_start = "keep_start"
    keep_ends = "keep_ends"  # half from each end: a TL;DR prompt's head and its "TL;DR:" cue


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one row; ``rejected_ids`` is None for SFT rows.

    ``ref_logps`` holds the reference's summed (chosen, rejected) log-probs when they were
    precomputed (``reference=precomputed``), else None. ``index`` is the row's index in its split
    when a dataset serves it (-1: a stand-in row that counts for nothing). ``label``: a KTO row's
    (desirable or not; :mod:`dpo.data.unpaired`), else None.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    ref_logps: tuple[float, float] | None = None
    index: int = -1
    label: bool | None = None


@dataclass
class TokenizeStats:
    """What tokenization did to a data set: counts and token lengths."""

    rows: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Rows, truncation counts and mean/p95/max of prompt and response lengths."""

        def pct(values: list[int], q: float) -> float:
            ordered = sorted(values)
            return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0

        out: dict[str, float] = {
            "rows": self.rows,
            "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated,
        }
        for name, values in (("prompt", self.prompt_lengths), ("response", self.response_lengths)):
            out[f"{name}_len_mean"] = sum(values) / max(len(values), 1)
            out[f"{name}_len_p95"] = pct(values, 0.95)
            out[f"{name}_len_max"] = float(max(values, default=0))
        return out


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of text by default (Llama does, GPT-2 not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


class PairTokenizer:
    """Tokenizes :class:`PreferenceRow` objects with the policy in the module docstring.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: the most tokens of prompt + response in one row.
        max_prompt_length: the most prompt tokens kept when a pair has to be truncated.
        truncation_side: which end of the prompt to keep.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        max_prompt_length: int,
        truncation_side: TruncationSide = TruncationSide.keep_end,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set one so responses can end")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        truncation_side = TruncationSide(truncation_side)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_side = truncation_side
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id
        self.stats = TokenizeStats()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _response(self, text: str) -> list[int]:
        """Response ids closed by exactly one EOS.

        A chat template may already end the turn with the EOS token and a newline
        (``...<|im_end|>\n`` when EOS is ``<|im_end|>``): the trailing whitespace is dropped and no
        second EOS is added.
        """
        stripped = text.rstrip()
        if stripped != text and self.tokenizer.eos_token and stripped.endswith(self.tokenizer.eos_token):
            text = stripped
        ids = self._encode(text)
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids

    def _truncate_prompt(self, ids: list[int]) -> list[int]:
        n = self.max_prompt_length
        if len(ids) <= n:
            return ids
        head = [ids[0]] if self.bos is not None and ids[0] == self.bos else []
        body = ids[len(head) :]
        keep = n - len(head)
        if self.truncation_side == TruncationSide.keep_ends:
            return head + body[: keep - keep // 2] + body[len(body) - keep // 2 :]
        return head + (body[-keep:] if self.truncation_side == TruncationSide.keep_end else body[:keep])

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's ids as a row's would start (BOS where the tokenizer adds one), cut to
        ``max_prompt_length`` on the configured side: prompts sampled from outside the pairs."""
        ids = self._encode(text)
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos] + ids
        return self._truncate_prompt(ids)

    def __call__(self, row: PreferenceRow) -> TokenizedPair:
        """Tokenize one row, updating :attr:`stats`. Raises DataError naming the row."""
        prompt = self._encode(row.prompt)
        if self.bos is not None and (not prompt or prompt[0] != self.bos):
            prompt = [self.bos] + prompt
        if not prompt:
            raise DataError(
                f"{row.where}: empty prompt and the tokenizer adds no BOS token, so the first "
                "response token would have nothing to be predicted from"
            )
        responses = [self._response(row.chosen)]
        if row.rejected is not None:
            responses.append(self._response(row.rejected))
        for text, ids in zip((row.chosen, row.rejected), responses, strict=False):
            if len(ids) < 2:
                raise DataError(f"{row.where}: response {text!r} has no tokens")
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > self.max_length:
            cut = self._truncate_prompt(prompt)
            self.stats.prompt_truncated += len(cut) < len(prompt)
            prompt = cut
        room = self.max_length - len(prompt)
        if longest > room:
            self.stats.response_truncated += 1
            responses = [r[:room] for r in responses]
        self.stats.rows += 1
        self.stats.prompt_lengths.append(len(prompt))
        self.stats.response_lengths.extend(len(r) for r in responses)
        return TokenizedPair(prompt, responses[0], responses[1] if len(responses) > 1 else None, label=row.label)
