"""Reward functions: VADER, the TF-IDF classifier, a Hugging Face classifier's positive score."""

from __future__ import annotations

import json

import pytest
import torch

from dpo.rewards.registry import REWARDS, build_reward, classifier_reward, positive_index, read_labelled

POSITIVE = ["a wonderful film, moving and funny", "great acting and a lovely score", "I loved every minute of it",
            "a superb, warm and touching story", "brilliant direction, a delight to watch"]  # fmt: skip
NEGATIVE = ["a dull, boring waste of time", "terrible acting and an awful script", "I hated every minute of it",
            "a tedious, lifeless and stupid story", "bad direction, painful to watch"]  # fmt: skip


def test_registry_names_and_unknown_reward():
    assert {"vader", "tfidf", "hf_classifier"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'sentiment'"):
        build_reward("sentiment")


def test_vader_ranks_positive_above_negative():
    scores = build_reward("vader")(POSITIVE + NEGATIVE)
    assert all(-1 <= s <= 1 for s in scores)
    assert min(scores[:5]) > 0 > max(scores[5:])


def test_tfidf_trains_on_a_local_file_and_ranks_held_out_text(tmp_path):
    path = tmp_path / "labelled.jsonl"
    rows = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    logit = build_reward("tfidf", train_file=str(path))
    prob = build_reward("tfidf", train_file=str(path), output="prob")
    good, bad = "a wonderful, moving story", "a boring, awful script"
    assert logit([good])[0] > 0 > logit([bad])[0]
    assert 0.5 < prob([good])[0] <= 1 and 0 <= prob([bad])[0] < 0.5


def test_labelled_file_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n{"text": "", "label": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: 'text' must be a non-empty string"):
        read_labelled(path)
    path.write_text('{"text": "fine", "label": 1}\n')
    with pytest.raises(ValueError, match="needs both positive"):
        read_labelled(path)
    path.write_text('{"text": "a fine\u2028film", "label": 1}\n{"text": "dull", "label": 0}\n', encoding="utf-8")
    assert read_labelled(path) == (["a fine\u2028film", "dull"], [1, 0])  # one reader: U+2028 splits no row


def test_tfidf_default_corpus_is_the_projects_own_and_ranks_sentiment():
    """No download and no third-party code: the default training text comes from dpo.data.synthetic."""
    from dpo.data.synthetic import labelled_reviews

    rows = labelled_reviews(40, seed=3)
    assert [r["label"] for r in rows[:4]] == [1, 0, 1, 0] and len({r["text"] for r in rows}) == 40
    reward = build_reward("tfidf")
    assert min(reward(POSITIVE[:2])) > max(reward(NEGATIVE[:2]))


def test_hf_classifier_scores_the_positive_class(tmp_path, bpe_tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(bpe_tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                        pad_token_id=bpe_tokenizer.pad_token_id)  # fmt: skip
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    bpe_tokenizer.save_pretrained(tmp_path / "clf")
    texts = ["a fine film", "a dull one, long and slow"]
    enc = bpe_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    for output in ("logit", "prob", "margin"):
        reward = build_reward("hf_classifier", pretrained=str(tmp_path / "clf"), output=output, max_length=64)
        expected = classifier_reward(logits, 1, output)
        torch.testing.assert_close(torch.tensor(reward(texts)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier_reward(logits, 1, "margin"), logits[:, 1] - logits[:, 0])
    assert positive_index({0: "NEGATIVE", 1: "POSITIVE"}, "positive") == 1
    with pytest.raises(ValueError, match="not among the classifier's labels"):
        positive_index({0: "LABEL_0", 1: "LABEL_1"}, "POSITIVE")
