"""Parsers of summarization data: the Reddit TL;DR comparisons and SFT sets, and news articles
(CNN/DailyMail), every prompt in one TL;DR format (``template``, default
``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``); responses are
``" " + summary``. Registered in :data:`dpo.data.formats.FORMATS`.
"""

from __future__ import annotations

import re
from typing import Any

from dpo.data.rows import BadRow, Filtered, get_field, new_row, text_field
from dpo.data.sources import PreferenceRow

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
_CARPER_PROMPT = re.compile(
    r"^SUBREDDIT:\s*r/(?P<subreddit>.*?)\s*\nTITLE:\s*(?P<title>.*?)\s*\nPOST:\s*(?P<post>.*?)\s*(?:TL;DR:\s*)?$",
    re.DOTALL,
)


def _tldr_prompt(template: str, subreddit: str, title: str, post: str) -> str:
    return template.format(subreddit=subreddit.strip(), title=title.strip(), post=post.strip())


def _summary(text: str) -> str:
    text = text.strip()
    if text.startswith("TL;DR:"):
        text = text[len("TL;DR:") :].strip()
    if not text:
        raise BadRow("empty_response", "a summary is empty")
    return " " + text


def parse_tldr(record: Any, where: str, *, template: str = TLDR_TEMPLATE) -> list[PreferenceRow]:
    """``openai/summarize_from_feedback`` (config ``comparisons``): info, two summaries, a choice."""
    info = get_field(record, "info")
    if not isinstance(info, dict):
        raise BadRow("not_an_object", "field 'info' must be an object")
    if not isinstance(info.get("post"), str) or not info["post"].strip():
        raise BadRow("no_post", "info.post is missing or empty (a news article row, not a Reddit post)")
    for key in ("title", "subreddit"):
        if not isinstance(info.get(key), str):
            raise BadRow("missing_field", f"info.{key} is missing or not a string")
    prompt = _tldr_prompt(template, info["subreddit"], info["title"], info["post"])
    return [_comparison_row(record, prompt, where)]


ARTICLE_SUBREDDIT = "news"
"""The ``SUBREDDIT`` a news article gets in the TL;DR prompt format (the CNN/DailyMail test)."""


def parse_tldr_articles(
    record: Any, where: str, *, template: str = TLDR_TEMPLATE, subreddit: str = ARTICLE_SUBREDDIT
) -> list[PreferenceRow]:
    """The CNN/DailyMail rows of ``openai/summarize_from_feedback`` comparisons (``info.article``;
    the validation split holds them), in the TL;DR prompt format: the article as the post, its
    title (empty where there is none) and ``subreddit``; Reddit rows are filtered (counted)."""
    info = get_field(record, "info")
    if not isinstance(info, dict):
        raise BadRow("not_an_object", "field 'info' must be an object")
    article = info.get("article")
    if not isinstance(article, str) or not article.strip():
        raise Filtered("not_an_article", "info.article is empty (a Reddit post row)")
    title = info.get("title") if isinstance(info.get("title"), str) else ""
    return [_comparison_row(record, _tldr_prompt(template, subreddit, title, article), where)]


def _comparison_row(record: Any, prompt: str, where: str) -> PreferenceRow:
    """A comparisons record's two summaries as a row: the worker's ``choice`` preferred."""
    summaries, choice = get_field(record, "summaries"), get_field(record, "choice")
    if not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
        raise BadRow("bad_comparison", "need two summaries and choice 0 or 1")
    texts = [s.get("text") if isinstance(s, dict) else None for s in summaries]
    if not all(isinstance(t, str) for t in texts):
        raise BadRow("not_a_string", "summaries[i].text must be strings")
    return new_row(prompt, _summary(texts[choice]), _summary(texts[1 - choice]), where)


def parse_cnn_dailymail(
    record: Any, where: str, *, template: str = TLDR_TEMPLATE, subreddit: str = ARTICLE_SUBREDDIT
) -> list[PreferenceRow]:
    """``abisee/cnn_dailymail`` (config ``3.0.0``): the ``article`` in the TL;DR prompt format (no
    title) and its reference summary ``highlights`` (one line per highlight, joined with spaces):
    the DPO paper's out-of-distribution test (Sec. 6.3) judges TL;DR policies against it."""
    prompt = _tldr_prompt(template, subreddit, "", text_field(record, "article"))
    highlights = " ".join(line.strip() for line in text_field(record, "highlights").splitlines() if line.strip())
    return [new_row(prompt, " " + highlights, None, where)]


def _carper_prompt(record: Any, template: str) -> str:
    match = _CARPER_PROMPT.match(text_field(record, "prompt"))
    if match is None:
        raise BadRow("prompt_format", "prompt is not 'SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...'")
    return _tldr_prompt(template, **match.groupdict())


def parse_tldr_flat(record: Any, where: str, *, template: str = TLDR_TEMPLATE) -> list[PreferenceRow]:
    """``CarperAI/openai_summarize_comparisons``: prompt, chosen, rejected (``TL;DR: ...``)."""
    prompt = _carper_prompt(record, template)
    return [new_row(prompt, _summary(text_field(record, "chosen")), _summary(text_field(record, "rejected")), where)]


def parse_tldr_sft(record: Any, where: str, *, template: str = TLDR_TEMPLATE) -> list[PreferenceRow]:
    """``CarperAI/openai_summarize_tldr``: prompt and the reference summary ``label`` (SFT)."""
    return [new_row(_carper_prompt(record, template), _summary(text_field(record, "label")), None, where)]
