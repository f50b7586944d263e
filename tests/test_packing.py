"""Prompt-prefix sharing is exact: packed log-probs equal the separate layout's."""

from __future__ import annotations

import pytest
import torch

from dpo.data.collate import collate
from dpo.data.packing import pack_pairs
from dpo.data.sources import PreferenceRow
from dpo.data.tokenize import PairTokenizer
from dpo.logprobs import packed_kl, packed_logits, packed_logps, sequence_kl, sequence_logps


def pairs_for(tokenizer, max_length=64, max_prompt_length=16, side="keep_end"):
    pt = PairTokenizer(tokenizer, max_length, max_prompt_length, side)
    rows = [
        PreferenceRow('Write a short review of the drama "The Quiet Promise".\n', "A superb film.", "Dull.", "a"),
        PreferenceRow("Review it:", "I loved it, the cast is warm and the score is moving.", "No.", "b"),
        # A prompt long enough to be truncated, responses long enough to be cut.
        PreferenceRow("What did you think of it? " * 12, "The pacing is sharp. " * 10, "Boring boring. " * 9, "c"),
    ]
    return [pt(r) for r in rows], pt.stats


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
def test_packed_logps_equal_separate_layout(tiny_model, bpe_tokenizer, attn, side):
    tiny_model.config._attn_implementation = attn
    tiny_model.eval()
    pairs, stats = pairs_for(bpe_tokenizer, side=side)
    assert stats.prompt_truncated == 1 and stats.response_truncated == 1
    pad = bpe_tokenizer.pad_token_id
    sep = collate(pairs, pad_id=pad)
    packed = pack_pairs(pairs, pad_id=pad)
    with torch.no_grad():
        sep_logits = tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
        ref_logits = tiny_model(
            input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]
        ).logits + 0.1 * torch.randn_like(sep_logits)
        sep_lp = sequence_logps(sep_logits, sep["labels"])
        logits = packed_logits(tiny_model, packed)
        chosen, rejected = packed_logps(logits, packed["score_tgt"], packed["score_seg"])
    b = len(pairs)
    torch.testing.assert_close(chosen.sum, sep_lp.sum[:b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected.sum, sep_lp.sum[b:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chosen.n_tokens, sep_lp.n_tokens[:b])
    torch.testing.assert_close(rejected.n_tokens, sep_lp.n_tokens[b:])
    # The head ran only on scored positions: S = longest chosen + rejected, not the packed width.
    assert logits.shape[1] == max(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert packed_kl(logits, logits, packed["score_seg"]).abs().max() == 0
    assert sequence_kl(sep_logits, ref_logits, sep["labels"]).shape == (2 * b,)


def test_rejected_cannot_see_chosen_and_positions_restart(bpe_tokenizer):
    pairs, _ = pairs_for(bpe_tokenizer)
    packed = pack_pairs(pairs[:1], pad_id=0)
    p, c = len(pairs[0].prompt_ids), len(pairs[0].chosen_ids)
    mask = packed["attention_mask"][0, 0]
    assert not mask[p + c :, p : p + c].any()  # rejected rows never see chosen columns
    assert mask[p + c :, :p].all() and mask[p : p + c, :p].all()  # both see the whole prompt
    assert packed["position_ids"][0, p + c].item() == p == packed["position_ids"][0, p].item()
    assert packed["score_pos"][0, c].item() == p - 1  # first rejected token predicted by the prompt's end


@pytest.mark.parametrize("reference", ["copy", "precomputed", "lora"])
def test_training_with_shared_prefix_follows_the_separate_trajectory(tmp_path, reference):
    import csv

    from conftest import FAST, compose_config, shrink
    from dpo.train import train

    def run(layout):
        out = tmp_path / layout
        cfg = shrink(
            compose_config(
                [
                    *FAST,
                    "trainer.max_steps=4",
                    "trainer.log_every_n_steps=1",
                    f"reference={reference}",
                    f"data.layout={layout}",
                ],
                out,
            )
        )
        metrics = train(cfg)
        rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
        keys = ("train/loss", "train/rewards/margin", "train/length/rejected")
        return {k: [float(r[k]) for r in rows if r.get(k)] for k in keys}, metrics

    (sep, sep_final), (packed, packed_final) = run("separate"), run("shared_prefix")
    for key, values in sep.items():
        assert len(values) == 4 and packed[key] == pytest.approx(values, abs=1e-5, rel=1e-6), key
    for key, value in sep_final.items():
        assert packed_final[key] == pytest.approx(value, abs=1e-5, rel=1e-6), key
