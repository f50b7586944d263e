"""Parsers from each data set's own schema to :class:`PreferenceRow` objects, and their registry.

A parser takes one raw record and returns the preference rows in it (usually one). It raises
:class:`BadRow` for a row it cannot use (missing or non-string field, empty text, a prompt that is
not a prefix of its responses) and :class:`Filtered` for a row the configuration leaves out on
purpose (a multi-turn dialogue under ``single_turn``, an SHP pair below the score ratio).
:func:`load_rows` applies the ``on_bad_row`` policy: ``error`` stops at the first bad row with its
source and row number; ``skip`` counts bad rows by reason. Filtered rows are always counted.

Prompt formats (exactly what the model sees; ``data.source.options`` can change the templates):

* ``hh``: the dialogue up to and including the last ``"\\n\\nAssistant:"``; responses are what
  follows (they start with a space).
* ``tldr``, ``tldr_flat``, ``tldr_sft``, ``tldr_articles``, ``cnn_dailymail``
  (:mod:`dpo.data.summaries`): ``template`` filled with subreddit, title and post (a news article
  as the post); responses are ``" " + summary``.
* ``shp``: ``"\\n\\nHuman: " + history + "\\n\\nAssistant:"``, responses ``" " + comment``, as in the
  official DPO repo.
* ``imdb``: the first 2-8 words (or tokens: ``prefix_unit``) of a review
  (``prefix_min_words``..``prefix_max_words``) as the prompt, the rest of the review as the response.
* ``chat``: messages rendered with the tokenizer's chat template (HH-style ``Human:``/``Assistant:``
  text when it has none); the response is the rendered text after the rendered prompt.
* ``fields``: plain strings from configurable fields, used as they are.
* ``unpaired``: a prompt, one completion and a boolean label per row (KTO's data).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from dpo.data.rows import BadRow, Filtered, get_field, new_row, text_field
from dpo.data.sources import DataError, PreferenceRow, SourceSpec, Unreadable, iter_records
from dpo.data.summaries import (
    parse_cnn_dailymail,
    parse_tldr,
    parse_tldr_articles,
    parse_tldr_flat,
    parse_tldr_sft,
)


def parse_fields(
    record: Any, where: str, *, prompt: str = "prompt", chosen: str = "chosen", rejected: str | None = "rejected"
) -> list[PreferenceRow]:
    """Plain-text fields, named by the options; ``rejected: null`` for SFT data."""
    return [
        new_row(
            text_field(record, prompt, allow_empty=True),
            text_field(record, chosen),
            text_field(record, rejected) if rejected is not None else None,
            where,
        )
    ]


def parse_unpaired(
    record: Any, where: str, *, prompt: str = "prompt", completion: str = "completion", label: str = "label"
) -> list[PreferenceRow]:
    """Unpaired rows (TRL's unpaired preference schema): a prompt, one completion and a boolean label
    (true: desirable, false: undesirable), for KTO."""
    value = get_field(record, label)
    if not isinstance(value, bool):
        raise BadRow("not_a_bool", f"field {label!r} must be true or false, got {value!r}")
    row = new_row(text_field(record, prompt, allow_empty=True), text_field(record, completion), None, where)
    return [replace(row, label=value)]


HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


def split_hh(dialogue: str) -> tuple[str, str]:
    """Split an HH dialogue after its last ``"\\n\\nAssistant:"``: (prompt, response)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("no_assistant_turn", f"no {HH_ASSISTANT!r} in the dialogue")
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def parse_hh(record: Any, where: str, *, single_turn: bool = False) -> list[PreferenceRow]:
    """Anthropic HH: two full dialogues that must share everything up to the last assistant turn."""
    prompt, chosen = split_hh(text_field(record, "chosen"))
    other_prompt, rejected = split_hh(text_field(record, "rejected"))
    if prompt != other_prompt:
        raise BadRow("prompts_differ", "chosen and rejected dialogues differ before the last assistant turn")
    if single_turn and prompt.count(HH_HUMAN) != 1:
        raise Filtered("multi_turn", "multi-turn dialogue left out (single_turn=true)")
    return [new_row(prompt, chosen, rejected, where)]


def parse_shp(record: Any, where: str, *, min_score_ratio: float = 2.0) -> list[PreferenceRow]:
    """Stanford SHP: two comments on a post, ``labels`` 1 when A is preferred; low-ratio pairs left out."""
    history = text_field(record, "history")
    a, b = text_field(record, "human_ref_A"), text_field(record, "human_ref_B")
    score_a, score_b, label = get_field(record, "score_A"), get_field(record, "score_B"), get_field(record, "labels")
    if not all(isinstance(x, int | float) for x in (score_a, score_b)) or label not in (0, 1):
        raise BadRow("bad_scores", "score_A/score_B must be numbers and labels 0 or 1")
    low, high = sorted((score_a, score_b))
    ratio = high / low if low > 0 else float("inf")
    if ratio < min_score_ratio:
        raise Filtered("score_ratio_below_min", f"score ratio {ratio:.2f} < {min_score_ratio}")
    prompt = HH_HUMAN + " " + history + HH_ASSISTANT
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return [new_row(prompt, " " + chosen, " " + rejected, where)]


def parse_imdb(
    record: Any,
    where: str,
    *,
    prefix_min_words: int = 2,
    prefix_max_words: int = 8,
    prefix_unit: str = "words",
    seed: int = 0,
    strip_html: bool = True,
    tokenizer: Any = None,
) -> list[PreferenceRow]:
    """IMDB reviews: a prefix of 2-8 words or tokens (its length deterministic per review) as the
    prompt and the rest of the review as the response.

    ``prefix_unit``: ``words`` (whitespace words; the split does not depend on the tokenizer) or
    ``tokens`` (the paper's App. C.1: "prefixes of length 2-8 tokens"; the prompt is the decoded
    first k tokens of the tokenizer's encoding of the review, the response the decoded rest).
    ``prefix_min_words``/``prefix_max_words`` bound k in that unit.
    """
    if prefix_unit not in ("words", "tokens"):
        raise DataError(f"data.source.options.prefix_unit must be words or tokens, got {prefix_unit!r}")
    if not 1 <= prefix_min_words <= prefix_max_words:
        raise DataError(f"data.source.options: need 1 <= prefix_min_words <= prefix_max_words, got "
                        f"{prefix_min_words} and {prefix_max_words}")  # fmt: skip
    text = text_field(record, "text")
    if strip_html:
        text = re.sub(r"<br\s*/?>", " ", text)
    span = prefix_max_words - prefix_min_words + 1
    k = prefix_min_words + zlib.crc32(f"{seed}:{text}".encode()) % span
    if prefix_unit == "tokens":
        if tokenizer is None:
            raise DataError("data.source.options.prefix_unit=tokens needs the tokenizer")
        ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"]
        if len(ids) <= k:
            raise Filtered("too_short", f"review has {len(ids)} tokens, the prefix needs more than {k}")
        head, rest = tokenizer.decode(ids[:k]), tokenizer.decode(ids[k:])
        prompt = head.rstrip()  # trailing whitespace goes with the response
        response = head[len(prompt) :] + rest
        if not prompt.strip() or not response.strip():
            raise Filtered("too_short", f"the first {k} tokens or the rest decode to whitespace")
        return [new_row(prompt, response, None, where)]
    words = text.split()
    if len(words) <= k:
        raise Filtered("too_short", f"review has {len(words)} words, the prefix needs more than {k}")
    return [new_row(" ".join(words[:k]), " " + " ".join(words[k:]), None, where)]


def imdb_prompt(text: str, k: int) -> str:
    """The first ``k`` words of a review, as used for sampling prompts."""
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split()[:k])


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise BadRow("bad_messages", f"field {key!r} must be a string or a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response_messages(prompt: list[dict[str, str]], full: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    """The messages of ``full`` after the prompt: ``full`` either repeats the prompt or holds only replies."""
    if full[: len(prompt)] == prompt:
        rest = full[len(prompt) :]
    elif all(m["role"] == "assistant" for m in full):
        rest = full
    else:
        raise BadRow(
            "prompt_not_prefix", f"field {key!r} neither starts with the prompt messages nor holds only replies"
        )
    if not rest or not any(m["content"].strip() for m in rest):
        raise BadRow("empty_response", f"field {key!r} has no response after the prompt")
    return rest


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """Messages as text: the tokenizer's chat template, or HH-style turns when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    text = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return text + (HH_ASSISTANT if generation_prompt else "")


def parse_chat(
    record: Any,
    where: str,
    *,
    tokenizer: Any,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
) -> list[PreferenceRow]:
    """Chat-format pairs (e.g. UltraFeedback-binarized): message lists rendered with the chat template.

    The prompt is rendered with the generation prompt; each response is the rendered full
    conversation minus that prefix, which must be an exact prefix (else the row is bad).
    """
    if tokenizer is None:
        raise DataError("the chat format needs a tokenizer to render messages")
    prompt_msgs = _messages(get_field(record, prompt), prompt)
    prompt_text = render_chat(tokenizer, prompt_msgs, generation_prompt=True)
    responses = []
    for key in (chosen, rejected):
        reply = _response_messages(prompt_msgs, _messages(get_field(record, key), key), key)
        full = render_chat(tokenizer, prompt_msgs + reply, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise BadRow("prompt_not_prefix", f"rendered {key!r} conversation does not start with the rendered prompt")
        responses.append(full[len(prompt_text) :])
    return [new_row(prompt_text, responses[0], responses[1], where)]


@dataclass(frozen=True)
class Format:
    """A registered parser and what it yields.

    Attributes:
        parse: ``(record, where, **options) -> list[PreferenceRow]``.
        has_pairs: whether rows carry a rejected response, given the options.
        needs_tokenizer: whether, given the options, the parser needs the tokenizer (chat templates;
            IMDB's token prefixes); it is then passed as ``tokenizer``.
        corpus_options: options under which it needs none, for reading the corpus a BPE tokenizer
            is trained on (the same texts, cut otherwise); None: no such options (chat templates).
        labelled: its rows are labelled completions (KTO's), not pairs or SFT targets.
    """

    parse: Callable[..., list[PreferenceRow]]
    has_pairs: Callable[[dict[str, Any]], bool]
    needs_tokenizer: Callable[[dict[str, Any]], bool] = lambda options: False
    corpus_options: dict[str, Any] | None = field(default_factory=dict)
    labelled: bool = False


def _always(options: dict[str, Any]) -> bool:
    return True


def _never(options: dict[str, Any]) -> bool:
    return False


FORMATS: dict[str, Format] = {
    "fields": Format(parse_fields, lambda o: o.get("rejected", "rejected") is not None),
    "unpaired": Format(parse_unpaired, _never, labelled=True),
    "hh": Format(parse_hh, _always),
    "tldr": Format(parse_tldr, _always),
    "tldr_flat": Format(parse_tldr_flat, _always),
    "tldr_sft": Format(parse_tldr_sft, _never),
    "tldr_articles": Format(parse_tldr_articles, _always),
    "cnn_dailymail": Format(parse_cnn_dailymail, _never),
    "shp": Format(parse_shp, _always),
    "imdb": Format(parse_imdb, _never, needs_tokenizer=lambda o: o.get("prefix_unit", "words") == "tokens",
                   corpus_options={"prefix_unit": "words"}),
    "chat": Format(parse_chat, _always, needs_tokenizer=_always, corpus_options=None),
}


def get_format(name: str) -> Format:
    """Look up a parser, with the valid names in the error."""
    if name not in FORMATS:
        raise DataError(f"data.source.format={name!r} is not a known format; choose from {sorted(FORMATS)}")
    return FORMATS[name]


@dataclass
class LoadReport:
    """What reading a split did: rows kept, bad rows and filtered rows by reason."""

    records: int = 0
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)


def load_rows(
    spec: SourceSpec, split: str, *, on_bad_row: str = "error", tokenizer: Any = None
) -> tuple[list[PreferenceRow], LoadReport]:
    """Read and parse one split, applying the bad-row policy.

    Raises:
        DataError: the first bad row under ``on_bad_row="error"`` (naming source and row), an
            unreadable source, or a split with no usable rows.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row must be error or skip, got {on_bad_row!r}")
    fmt = get_format(spec.format)
    options = dict(spec.options)
    if fmt.needs_tokenizer(options):
        options["tokenizer"] = tokenizer
    report, rows = LoadReport(), []
    for where, record in iter_records(spec, split):
        report.records += 1
        try:
            if isinstance(record, Unreadable):
                raise BadRow("unreadable", record.reason)
            rows.extend(fmt.parse(record, where, **options))
        except Filtered as e:
            report.filtered[e.reason] += 1
        except BadRow as e:
            if on_bad_row == "error":
                raise DataError(f"{where}: {e} (set data.on_bad_row=skip to skip and count such rows)") from None
            report.skipped[e.reason] += 1
        except TypeError as e:  # an unknown option reaches the parser as an unexpected keyword
            raise DataError(f"data.source.options do not fit format {spec.format!r}: {e}") from None
    report.rows = len(rows)
    if not rows:
        raise DataError(
            f"{split} split of {spec.path or spec.splits.get(split)}: no usable rows "
            f"({report.records} records, skipped {dict(report.skipped)}, filtered {dict(report.filtered)})"
        )
    return rows, report
