"""The tokenization policy: separate prompt/response tokenization, BOS/EOS, truncation, masks."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dpo.data.batch import IGNORE_INDEX
from dpo.data.collate import collate
from dpo.data.sources import DataError, PreferenceRow
from dpo.data.tokenize import PairTokenizer, adds_bos


def row(prompt, chosen, rejected="no", where="f.jsonl:1"):
    return PreferenceRow(prompt, chosen, rejected, where)


@pytest.fixture(scope="module")
def llama_style_tokenizer(bundled_rows):
    """A Metaspace BPE that adds BOS by itself, like Llama's sentencepiece tokenizers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([t for r in bundled_rows[:500] for t in (r.prompt, r.chosen)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def test_boundary_merge_is_avoided(bpe_tokenizer):
    """Joint tokenization merges the prompt's trailing space into ' is'; ours keeps them apart."""
    prompt, response = "The film ", "is wonderful."
    enc = lambda s: bpe_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc(prompt + response) != enc(prompt) + enc(response)  # the trap exists in this tokenizer
    pair = PairTokenizer(bpe_tokenizer, 64, 32)(row(prompt, response))
    assert pair.prompt_ids == enc(prompt)
    assert pair.chosen_ids == enc(response) + [bpe_tokenizer.eos_token_id]
    assert pair.rejected_ids == enc("no") + [bpe_tokenizer.eos_token_id]


def test_gpt2_style_adds_no_bos_llama_style_adds_exactly_one(bpe_tokenizer, llama_style_tokenizer):
    assert not adds_bos(bpe_tokenizer) and adds_bos(llama_style_tokenizer)
    bos = llama_style_tokenizer.bos_token_id
    pair = PairTokenizer(llama_style_tokenizer, 64, 32)(row("<s> Hello there", " fine"))
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos  # a BOS in the text is not doubled
    pair = PairTokenizer(llama_style_tokenizer, 64, 32)(row("Hello there", " fine"))
    assert pair.prompt_ids.count(bos) == 1 and bos not in pair.chosen_ids
    assert pair.chosen_ids[-1] == llama_style_tokenizer.eos_token_id


@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
def test_truncation_cuts_prompt_first_then_responses_never_empty(bpe_tokenizer, llama_style_tokenizer, side):
    for tok in (bpe_tokenizer, llama_style_tokenizer):
        long_prompt = " ".join(f"w{i}" for i in range(80))
        long_resp = " ".join(f"r{i}" for i in range(80))
        pt = PairTokenizer(tok, max_length=40, max_prompt_length=30, truncation_side=side)
        full_prompt = pt(row(long_prompt, "ok")).prompt_ids  # truncated: prompt > 40 - 2
        enc = tok(long_prompt, add_special_tokens=False)["input_ids"]
        body = full_prompt[1:] if adds_bos(tok) else full_prompt
        assert body == (enc[-len(body) :] if side == "keep_end" else enc[: len(body)])
        assert len(full_prompt) == 30
        if adds_bos(tok):
            assert full_prompt[0] == tok.bos_token_id
        pair = pt(row(long_prompt, long_resp, long_resp))
        assert len(pair.prompt_ids) == 30
        assert len(pair.prompt_ids) + len(pair.chosen_ids) == 40
        assert pair.chosen_ids[-1] != tok.eos_token_id  # a cut response did not end
        assert pt.stats.prompt_truncated == 2 and pt.stats.response_truncated == 1
        short = pt(row("short prompt", long_resp, "ok"))
        assert len(short.prompt_ids) + len(short.chosen_ids) == 40 and len(short.rejected_ids) >= 2


def test_response_survives_even_at_the_tightest_lengths(bpe_tokenizer):
    pt = PairTokenizer(bpe_tokenizer, max_length=5, max_prompt_length=4)
    pair = pt(row("a very long prompt " * 10, "and a long answer " * 10, "x " * 50))
    assert len(pair.chosen_ids) == 1 and len(pair.rejected_ids) == 1 and len(pair.prompt_ids) == 4


def test_empty_prompt_without_bos_is_an_error_naming_the_row(bpe_tokenizer):
    with pytest.raises(DataError, match="data.jsonl:7: empty prompt"):
        PairTokenizer(bpe_tokenizer, 64, 32)(row("", "hi", where="data.jsonl:7"))


def test_bad_lengths_are_rejected(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length"):
        PairTokenizer(bpe_tokenizer, 32, 32)


def test_collate_shares_prompt_masks_prompt_and_padding(bpe_tokenizer):
    pt = PairTokenizer(bpe_tokenizer, 64, 32)
    pairs = [pt(row("Rate it: ", "great film", "bad")), pt(row("Longer prompt here: ", "ok", "terrible awful film"))]
    batch = collate(pairs, pad_id=bpe_tokenizer.pad_token_id)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[0] == 4  # [chosen_0, chosen_1, rejected_0, rejected_1]
    width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert ids.shape[1] == width  # dynamic padding to the longest row
    for i, p in enumerate(pairs):
        n = len(p.prompt_ids)
        for r, resp in ((i, p.chosen_ids), (i + 2, p.rejected_ids)):
            assert ids[r, :n].tolist() == p.prompt_ids  # identical prompt tokens in both rows
            assert ids[r, n : n + len(resp)].tolist() == resp
            assert torch.all(labels[r, :n] == IGNORE_INDEX)  # prompt masked
            assert labels[r, n : n + len(resp)].tolist() == resp  # response scored
            assert torch.all(labels[r, n + len(resp) :] == IGNORE_INDEX)  # padding masked
            assert att[r].sum().item() == n + len(resp)
    sft = collate(pairs, pad_id=0, pairs=False)
    assert sft["input_ids"].shape[0] == 2


def test_chat_turn_already_closed_by_eos_gets_no_second_eos(bpe_tokenizer):
    """ChatML with EOS = <|im_end|>: '...<|im_end|>\\n' ends with one EOS, not '<|im_end|>\\n<|im_end|>'."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    pair = PairTokenizer(tok, 64, 32)(row("<|im_start|>user\nhi<|im_end|>\n", "hello<|im_end|>\n", "go<|im_end|>\n"))
    eos = tok.eos_token_id
    assert pair.chosen_ids.count(eos) == 1 and pair.chosen_ids[-1] == eos
    assert pair.chosen_ids == tok("hello", add_special_tokens=False)["input_ids"] + [eos]
    plain = PairTokenizer(tok, 64, 32)(row("q: ", "answer", "other"))
    assert plain.chosen_ids[-1] == eos and plain.chosen_ids.count(eos) == 1
