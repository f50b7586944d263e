"""The text of sampled completions and the texts the rewards score (dpo.models.completions)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpo.models.completions import completion_texts, score_texts


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama, Mistral): the word's space is the first character of its token."""
    vocab = {"<unk>": 0, "▁The": 1, "▁movie": 2, "▁was": 3, "▁great": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_sentencepiece_completion_keeps_the_space_its_first_token_carries(metaspace_tokenizer):
    """Decoded alone, ``[▁was, ▁great]`` reads 'was great' and the reward would score 'The moviewas great'
    (the bug of decoding prompt and completion apart); the completion's text is ' was great'."""
    prompt, completion = [1, 2], [3, 4]
    assert metaspace_tokenizer.decode(completion) == "was great"
    heads, texts = completion_texts(metaspace_tokenizer, [prompt], [completion])
    assert heads == ["The movie"] and texts == [" was great"]
    assert heads[0] + texts[0] == metaspace_tokenizer.decode(prompt + completion)


def test_byte_level_texts_are_the_decoded_parts_and_join_to_the_whole(bpe_tokenizer):
    """For a byte-level BPE (GPT-2, SmolLM2) each part decodes to the same text alone or in context,
    so the texts are the ones every stage wrote before this helper existed."""
    ids = bpe_tokenizer("the film was a delight from start to end")["input_ids"]
    prompts, completions = [ids[:3], ids[:5]], [ids[3:], ids[5:]]
    heads, texts = completion_texts(bpe_tokenizer, prompts, completions)
    for p, c, h, t in zip(prompts, completions, heads, texts, strict=True):
        assert h == bpe_tokenizer.decode(p) and t == bpe_tokenizer.decode(c)
        assert h + t == bpe_tokenizer.decode(p + c)


def test_a_character_split_between_prompt_and_completion_falls_back_to_the_completion_alone(bpe_tokenizer):
    """'é' is two UTF-8 bytes; with the first byte ending the prompt, the prompt's text ends in U+FFFD and
    is no prefix of the whole, so the completion is decoded alone (never a text cut at a wrong offset)."""
    byte_ids = bpe_tokenizer.convert_tokens_to_ids(["Ã", "©"])  # byte-level symbols of 0xC3 0xA9 ('é')
    if bpe_tokenizer.unk_token_id in byte_ids or None in byte_ids:
        pytest.skip("the tokenizer has no single-byte tokens for é")
    prompt, completion = [byte_ids[0]], [byte_ids[1]]
    assert bpe_tokenizer.decode(prompt + completion) == "é"
    heads, texts = completion_texts(bpe_tokenizer, [prompt], [completion])
    assert heads == [bpe_tokenizer.decode(prompt)] and texts == [bpe_tokenizer.decode(completion)]


def test_the_reward_scores_prompt_and_completion_or_the_completion_alone():
    def lengths(texts: list[str]) -> list[float]:
        return [float(len(t)) for t in texts]

    assert score_texts(lengths, ["ab", "c"], ["de", "fgh"], include_prompt=True) == [4.0, 4.0]
    assert score_texts(lengths, ["ab", "c"], ["de", "fgh"], include_prompt=False) == [2.0, 3.0]
