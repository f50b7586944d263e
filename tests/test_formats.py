"""Each data set's parser on hand-written fixtures in the source's exact schema.

The fixtures under tests/fixtures/<source>/ are read through the same path as a hub download
(records -> parser -> rows); only the record reader differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dpo.data.formats import load_rows
from dpo.data.sources import DataError, SourceSpec
from dpo.data.summaries import TLDR_TEMPLATE
from dpo.data.tokenize import PairTokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def spec(fmt, folder, splits=("train", "train"), **options):
    return SourceSpec(fmt, {"train": splits[0], "val": splits[1]}, path=str(FIXTURES / folder), options=options)


def test_hh_splits_at_the_last_assistant_turn_and_reports_bad_rows():
    with pytest.raises(DataError, match=r"hh/train.jsonl:5: a response is empty"):
        load_rows(spec("hh", "hh"), "train")
    rows, report = load_rows(spec("hh", "hh"), "train", on_bad_row="skip")
    assert report.records == 6 and len(rows) == 4
    assert report.skipped == {"empty_response": 1, "prompts_differ": 1}
    assert rows[0].prompt == "\n\nHuman: What is a good way to keep basil fresh?\n\nAssistant:"
    assert rows[0].chosen.startswith(" Trim the stems") and rows[0].rejected == " Put it in the freezer."
    multi = rows[1]  # the prompt keeps every earlier turn
    assert multi.prompt.endswith("\n\nHuman: How long should I boil an egg?\n\nAssistant:")
    assert multi.prompt.count("\n\nHuman:") == 2 and multi.chosen == " About nine minutes for a firm yolk."
    assert rows[3].chosen == " ありがとう (arigatou) 😊"


def test_hh_single_turn_filter_is_counted():
    rows, report = load_rows(spec("hh", "hh", single_turn=True), "train", on_bad_row="skip")
    assert len(rows) == 3 and report.filtered == {"multi_turn": 1}


POST = "My roommate keeps eating my food even after I labelled it. I asked nicely twice."
PROMPT = TLDR_TEMPLATE.format(subreddit="relationships", title="Roommate eats my food", post=POST)


def test_three_tldr_sources_give_the_same_prompt_and_responses():
    comparisons, report = load_rows(spec("tldr", "tldr"), "train", on_bad_row="skip")
    flat, flat_report = load_rows(spec("tldr_flat", "tldr_flat"), "train", on_bad_row="skip")
    sft, _ = load_rows(spec("tldr_sft", "tldr_sft"), "train")
    assert report.skipped == {"no_post": 1} and flat_report.skipped == {"prompt_format": 1}
    for row in (comparisons[0], flat[0], sft[0]):
        assert row.prompt == PROMPT
        assert row.chosen == " Roommate eats my labelled food despite asking twice."
    assert comparisons[0].rejected == flat[0].rejected == " food"
    assert comparisons[1].chosen == " I keep changing my mind about moving for a new job."  # choice = 1
    assert comparisons[2].prompt == flat[1].prompt and "☕" in flat[1].chosen
    assert sft[0].rejected is None and sft[1].prompt.endswith("\nTL;DR:") and len(sft[1].prompt) > 5000


def test_tldr_lengths_keep_every_posts_head_and_its_cue(bpe_tokenizer):
    """data=tldr's lengths (640 / 512, keep_ends): the fixture's over-long post (t3_2, a paragraph
    repeated) is cut in its middle, so the prompt still begins with SUBREDDIT/TITLE and ends with
    "TL;DR:"; the official 512/256 with keep_end cut the head away. Counted in prompt_truncated."""
    from hydra import compose, initialize_config_dir

    from dpo.commands.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        data = compose("train", overrides=["data=tldr"]).data
    assert (data.max_length, data.max_prompt_length, data.truncation_side) == (640, 512, "keep_ends")
    rows, _ = load_rows(spec("tldr", "tldr"), "train", on_bad_row="skip")
    long = next(r for r in rows if "move to a new city" in r.prompt)
    long = type(long)(long.prompt * 3, long.chosen, long.rejected, long.where)  # over 512 tokens of this BPE
    ours = PairTokenizer(bpe_tokenizer, data.max_length, data.max_prompt_length, data.truncation_side)
    official = PairTokenizer(bpe_tokenizer, 512, 256, "keep_end")
    for tok in (ours, official):
        tok(long)
        assert tok.stats.prompt_truncated == 1
    text = bpe_tokenizer.decode(ours(long).prompt_ids)
    assert text.startswith("SUBREDDIT: r/") and text.rstrip().endswith("TL;DR:") and len(ours(long).prompt_ids) == 512
    assert not bpe_tokenizer.decode(official(long).prompt_ids).startswith("SUBREDDIT: r/")
    short = next(r for r in rows if r.prompt == PROMPT)
    assert bpe_tokenizer.decode(ours(short).prompt_ids) == PROMPT  # a post within budget is never cut


def test_cnn_dailymail_articles_come_in_the_tldr_prompt_format():
    """The paper's out-of-distribution test (Sec. 6.3): the comparisons' news rows (data=tldr_cnndm;
    Reddit rows filtered and counted) and the CNN/DailyMail test articles with their highlights
    (data=cnn_dailymail), each article as the POST of the TL;DR template."""
    rows, report = load_rows(spec("tldr_articles", "tldr", subreddit="news"), "train", on_bad_row="skip")
    assert len(rows) == 1 and report.filtered == {"not_an_article": 3}
    assert rows[0].prompt == TLDR_TEMPLATE.format(subreddit="news", title="", post="A news article.")
    assert (rows[0].chosen, rows[0].rejected) == (" more news", " news")  # choice 1
    cnn = spec("cnn_dailymail", "cnn_dailymail", ("test", "test"))
    with pytest.raises(DataError, match=r"cnn_dailymail/test.jsonl:3: field 'article' is empty"):
        load_rows(cnn, "train")
    rows, report = load_rows(cnn, "train", on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {"empty_text": 1}
    assert rows[0].prompt.startswith("SUBREDDIT: r/news\nTITLE: \nPOST: LONDON, England (CNN) -- A cat")
    assert rows[0].prompt.endswith("on a ladder.\nTL;DR:") and rows[0].rejected is None
    assert rows[0].chosen == " Cat rescued from a tree in London . Firefighters spent two hours on a ladder ."


def test_shp_keeps_pairs_above_the_score_ratio_with_the_preferred_first():
    rows, report = load_rows(spec("shp", "shp"), "train")
    assert report.filtered == {"score_ratio_below_min": 1} and len(rows) == 3
    assert rows[0].prompt == "\n\nHuman: Why does my bread come out dense?\n\nAssistant:"
    assert rows[0].chosen.startswith(" Your dough") and rows[0].rejected == " Use more yeast."
    assert rows[1].chosen.startswith(" Check that your yeast")  # labels = 0: B preferred
    assert rows[0].prompt == rows[1].prompt  # several pairs for one post
    rows, report = load_rows(spec("shp", "shp", min_score_ratio=1.1), "train")
    assert len(rows) == 4


def test_imdb_prefixes_are_2_to_8_words_and_deterministic():
    rows, report = load_rows(spec("imdb", "imdb"), "train")
    assert report.filtered == {"too_short": 1} and len(rows) == 3
    for row in rows:
        assert 2 <= len(row.prompt.split()) <= 8 and row.rejected is None and "<br" not in row.chosen
    again, _ = load_rows(spec("imdb", "imdb"), "train")
    assert [r.prompt for r in again] == [r.prompt for r in rows]
    other, _ = load_rows(spec("imdb", "imdb", seed=1), "train")
    assert [r.prompt for r in other] != [r.prompt for r in rows]


def test_imdb_token_prefixes_are_2_to_8_tokens_of_the_tokenizer(bpe_tokenizer):
    """prefix_unit=tokens (the paper's App. C.1: prefixes of 2-8 tokens): the prompt is the first k
    tokens of the review's encoding, decoded; prompt + response give the review back."""
    rows, report = load_rows(spec("imdb", "imdb", prefix_unit="tokens"), "train", tokenizer=bpe_tokenizer)
    assert len(rows) >= 3
    for row in rows:
        k = len(bpe_tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
        assert 2 <= k <= 8, row.prompt
        assert not row.prompt.endswith(" ") and row.chosen.strip() and "<br" not in row.chosen
    words, _ = load_rows(spec("imdb", "imdb"), "train")
    for row, whole in zip(rows, words, strict=True):  # the same reviews, cut elsewhere
        assert (row.prompt + row.chosen).split() == (whole.prompt + whole.chosen).split()
    assert [r.prompt for r in rows] != [r.prompt for r in words]
    with pytest.raises(DataError, match="prefix_unit=tokens needs the tokenizer"):
        load_rows(spec("imdb", "imdb", prefix_unit="tokens"), "train")
    with pytest.raises(DataError, match="prefix_unit must be words or tokens"):
        load_rows(spec("imdb", "imdb", prefix_unit="chars"), "train")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_rows_render_with_the_template_and_keep_the_boundary(bpe_tokenizer):
    tok = bpe_tokenizer.__class__(
        tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    with pytest.raises(DataError, match=r"train_prefs.jsonl:3: field 'chosen' neither starts with the prompt"):
        load_rows(spec("chat", "ultrafeedback", ("train_prefs", "test_prefs")), "train", tokenizer=tok)
    rows, report = load_rows(
        spec("chat", "ultrafeedback", ("train_prefs", "test_prefs")), "train", on_bad_row="skip", tokenizer=tok
    )
    assert report.skipped == {"prompt_not_prefix": 1}
    assert rows[0].prompt == "<|im_start|>user\nWrite a haiku about autumn 🍂<|im_end|>\n<|im_start|>assistant\n"
    assert rows[0].chosen.startswith("Crisp leaves") and rows[0].chosen.endswith("<|im_end|>\n")
    assert rows[1].prompt == "<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\n"
    assert rows[1].chosen == "7<|im_end|>\n"
    pair = PairTokenizer(tok, 128, 64)(rows[1])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert pair.prompt_ids == enc(rows[1].prompt) and pair.chosen_ids[: len(enc("7"))] == enc("7")
    no_template, _ = load_rows(
        spec("chat", "ultrafeedback", ("train_prefs", "test_prefs")), "val", tokenizer=bpe_tokenizer
    )
    assert no_template[1].prompt == "\n\nHuman: Name a prime number.\n\nAssistant:"
    assert no_template[1].chosen == " 7"


@pytest.fixture(scope="module")
def metaspace_tokenizer(bundled_rows):
    """A Llama-style (Metaspace, BOS-adding) BPE trained on local text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([t for r in bundled_rows[:800] for t in (r.prompt, r.chosen, r.rejected)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("family", ["byte_level", "metaspace"])
@pytest.mark.parametrize(
    ("fmt", "folder", "splits"),
    [
        ("hh", "hh", ("train", "test")),
        ("tldr", "tldr", ("train", "validation")),
        ("shp", "shp", ("train", "validation")),
    ],
)
def test_every_source_tokenizes_prompt_and_responses_apart(request, family, fmt, folder, splits):
    tok = request.getfixturevalue("bpe_tokenizer" if family == "byte_level" else "metaspace_tokenizer")
    rows, _ = load_rows(spec(fmt, folder, splits), "train", on_bad_row="skip")
    pt = PairTokenizer(tok, max_length=50_000, max_prompt_length=40_000)  # no truncation here
    bos = [tok.bos_token_id] if family == "metaspace" else []
    for row in rows:
        pair = pt(row)
        assert pair.prompt_ids == bos + tok(row.prompt, add_special_tokens=False)["input_ids"]
        assert pair.chosen_ids == tok(row.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert pair.rejected_ids == tok(row.rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert pair.prompt_ids.count(tok.bos_token_id) <= 1
