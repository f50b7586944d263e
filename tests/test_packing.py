"""Prompt-prefix sharing is exact: shared-prefix and padding-free log-probs equal the separate layout's."""

from __future__ import annotations

import pytest
import torch

from dpo.data.batch import Layout
from dpo.data.collate import collate
from dpo.data.packing import pack_pairs
from dpo.data.sources import PreferenceRow
from dpo.data.tokenize import PairTokenizer
from dpo.maths.logprobs import scored_logps, sequence_kl, sequence_logps
from dpo.maths.tiled import HeadInputs
from dpo.models.forward import attention_for, scored_logits
from dpo.models.load import ModelConfig


def pairs_for(tokenizer, max_length=64, max_prompt_length=16, side="keep_end"):
    pt = PairTokenizer(tokenizer, max_length, max_prompt_length, side)
    rows = [
        PreferenceRow('Write a short review of the drama "The Quiet Promise".\n', "A superb film.", "Dull.", "a"),
        PreferenceRow("Review it:", "I loved it, the cast is warm and the score is moving.", "No.", "b"),
        # A prompt long enough to be truncated, responses long enough to be cut.
        PreferenceRow("What did you think of it? " * 12, "The pacing is sharp. " * 10, "Boring boring. " * 9, "c"),
    ]
    return [pt(r) for r in rows], pt.stats


def pack(pairs, pad, layout, model=None):
    """``layout`` batch of ``pairs``; padding-free switches ``model`` to segment attention first."""
    if layout == "padding_free" and model is not None:
        model.set_attn_implementation(attention_for(Layout.padding_free))
    return pack_pairs(pairs, pad_id=pad, padding_free=layout == "padding_free")


@pytest.mark.parametrize("layout", ["shared_prefix", "padding_free"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
def test_packed_logps_equal_separate_layout(tiny_model, bpe_tokenizer, attn, side, layout):
    tiny_model.config._attn_implementation = attn
    tiny_model.eval()
    pairs, stats = pairs_for(bpe_tokenizer, side=side)
    assert stats.prompt_truncated == 1 and stats.response_truncated == 1
    pad = bpe_tokenizer.pad_token_id
    sep = collate(pairs, pad_id=pad)
    with torch.no_grad():
        sep_logits = tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
        ref_logits = sep_logits + 0.1 * torch.randn_like(sep_logits)
        sep_lp = sequence_logps(sep_logits, sep["labels"])
        packed = pack(pairs, pad, layout, tiny_model)
        logits = scored_logits(tiny_model, packed)
        logps = scored_logps(logits, packed)
    b = len(pairs)
    torch.testing.assert_close(logps.chosen, sep_lp.sum[:b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps.rejected, sep_lp.sum[b:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps.chosen_tokens, sep_lp.n_tokens[:b])
    torch.testing.assert_close(logps.rejected_tokens, sep_lp.n_tokens[b:])
    # The head ran only on scored positions: S = a row's chosen + rejected tokens, not its width.
    responses = [len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert logits.shape[1] == (sum(responses) if layout == "padding_free" else max(responses))
    if layout == "padding_free":  # one row, not one token of padding
        assert packed["input_ids"].shape == (1, sum(len(p.prompt_ids) for p in pairs) + sum(responses))
    assert scored_logps(logits, packed, against=logits).chosen_kl.abs().max() == 0
    assert sequence_kl(sep_logits, ref_logits, sep["labels"]).shape == (2 * b,)


def test_segment_attention_is_sdpa_without_segments(tmp_path, tiny_model, bpe_tokenizer):
    """Generation and padded batches run through the segment-attention implementation unchanged."""
    tiny_model.eval()
    sep = collate(pairs_for(bpe_tokenizer)[0], pad_id=bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
        tiny_model.set_attn_implementation(attention_for(Layout.padding_free))
        got = tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
    assert tiny_model.config._attn_implementation == "dpo_segments"
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    tiny_model.save_pretrained(tmp_path)  # an export loads without dpo: the choice is not saved
    assert "dpo_segments" not in (tmp_path / "config.json").read_text()


def test_padding_free_refuses_a_model_that_drops_the_segments(tiny_model, bpe_tokenizer):
    """Under plain sdpa nobody reads ``segments``: pairs would attend to each other, so it must raise."""
    batch = pack_pairs(pairs_for(bpe_tokenizer)[0], pad_id=bpe_tokenizer.pad_token_id, padding_free=True)
    with pytest.raises(RuntimeError, match="0 attention layers of 2 ran pair by pair"):
        scored_logits(tiny_model, batch)


@pytest.mark.parametrize("plain_head", [True, False])
@pytest.mark.parametrize("pairs", [True, False])
def test_response_only_head_equals_full_forward_in_separate_layout(tiny_model, bpe_tokenizer, plain_head, pairs):
    """The separate layout's head runs on response positions only and changes no number.

    ``plain_head=False`` marks the config as soft-capped, which takes the full-forward fallback.
    """
    tiny_model.eval()
    if not plain_head:
        tiny_model.config.final_logit_softcapping = 30.0  # GPT-2 ignores it: both paths must agree
    pairs_, _ = pairs_for(bpe_tokenizer)
    sep = collate(pairs_, pad_id=bpe_tokenizer.pad_token_id, pairs=pairs)
    with torch.no_grad():
        full = tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
        ref = full + 0.3 * torch.randn_like(full)
        logits = scored_logits(tiny_model, sep)
        logps = scored_logps(logits, sep, pairs=pairs)
    expected = sequence_logps(full, sep["labels"])
    b = len(pairs_)
    torch.testing.assert_close(logps.chosen, expected.sum[:b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps.chosen_tokens, expected.n_tokens[:b])
    assert logits.shape[1] == int(expected.n_tokens.max())  # S = longest response, not T
    if pairs:
        torch.testing.assert_close(logps.rejected, expected.sum[b:], atol=1e-5, rtol=1e-5)
    else:
        assert logps.rejected.shape == logps.rejected_tokens.shape == (0,)
    # The KL on scored positions equals the full-logit KL (ref logits gathered at the same places).
    pos = sep["score_pos"].unsqueeze(-1).expand(-1, -1, full.shape[-1])
    kl = scored_logps(torch.gather(ref, 1, pos), sep, pairs=pairs, against=logits).chosen_kl  # reference's pass
    torch.testing.assert_close(kl, sequence_kl(full, ref, sep["labels"])[:b], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout", ["separate", "shared_prefix", "padding_free"])
def test_gradients_equal_the_full_forward(tiny_model, bpe_tokenizer, layout, checkpointing, tiled, monkeypatch):
    """The response-only head and the packed rows give the full-logit path's gradients, not just its
    values, also when gradient checkpointing recomputes the attention in backward, and when the
    log-probs are computed in tiles through the head (tiles of 64 logits: 1 token of this
    vocabulary at a time; :mod:`dpo.maths.tiled`)."""
    if tiled:
        monkeypatch.setattr("dpo.maths.tiled.TILE_ELEMENTS", 64)
    pairs, _ = pairs_for(bpe_tokenizer)
    pad = bpe_tokenizer.pad_token_id
    sep = collate(pairs, pad_id=pad)

    def grads(loss):
        tiny_model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in tiny_model.named_parameters()}

    full = sequence_logps(
        tiny_model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits, sep["labels"]
    )
    b = len(pairs)
    expected = grads((full.sum[:b] - 0.5 * full.sum[b:]).sum())
    batch = sep if layout == "separate" else pack(pairs, pad, layout, tiny_model)
    if checkpointing:
        tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scored = scored_logits(tiny_model, batch)
    assert isinstance(scored, HeadInputs) == tiled
    logps = scored_logps(scored, batch)
    got = grads((logps.chosen - 0.5 * logps.rejected).sum())
    for k, g in expected.items():
        torch.testing.assert_close(got[k], g, atol=1e-5, rtol=1e-4, msg=k)


def test_rejected_cannot_see_chosen_and_positions_restart(bpe_tokenizer):
    pairs, _ = pairs_for(bpe_tokenizer)
    packed = pack_pairs(pairs[:1], pad_id=0)
    p, c = len(pairs[0].prompt_ids), len(pairs[0].chosen_ids)
    mask = packed["attention_mask"][0, 0]
    assert not mask[p + c :, p : p + c].any()  # rejected rows never see chosen columns
    assert mask[p + c :, :p].all() and mask[p : p + c, :p].all()  # both see the whole prompt
    assert packed["position_ids"][0, p + c].item() == p == packed["position_ids"][0, p].item()
    assert packed["score_pos"][0, c].item() == p - 1  # first rejected token predicted by the prompt's end


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["copy", "precomputed", "lora"])
def test_training_with_shared_prefix_follows_the_separate_trajectory(tmp_path, reference):
    import csv

    from conftest import FAST, compose_config, shrink
    from dpo.commands.train import train

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

    sep, sep_final = run("separate")
    for layout in ("shared_prefix", "padding_free"):
        packed, packed_final = run(layout)
        for key, values in sep.items():
            assert len(values) == 4 and packed[key] == pytest.approx(values, abs=1e-5, rel=1e-6), (layout, key)
        for key, value in sep_final.items():
            assert packed_final[key] == pytest.approx(value, abs=1e-5, rel=1e-6), (layout, key)


@pytest.mark.parametrize("model_type, window", [("llama", None), ("mistral", 4096), ("mistral", 16)])
def test_padding_free_with_grouped_query_attention(bpe_tokenizer, model_type, window):
    """Llama-family models (SmolLM2's) with 2 key/value heads for 4 query heads: padding-free = separate.

    A sliding window longer than every pair changes nothing; a shorter one would, so it is refused.
    """
    from dpo.models.load import load_policy

    torch.manual_seed(0)
    arch = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    arch |= {"num_attention_heads": 4, "num_key_value_heads": 2}
    if model_type == "mistral":
        arch["sliding_window"] = window
    model = load_policy(ModelConfig(None, architecture=arch), tokenizer=bpe_tokenizer)
    model.eval()
    pairs, _ = pairs_for(bpe_tokenizer)
    sep = collate(pairs, pad_id=bpe_tokenizer.pad_token_id)
    batch = pack(pairs, bpe_tokenizer.pad_token_id, "padding_free", model)
    with torch.no_grad():
        if window == 16:
            with pytest.raises(ValueError, match="longer than the sliding window"):
                scored_logits(model, batch)
            return
        full = model(input_ids=sep["input_ids"], attention_mask=sep["attention_mask"]).logits
        expected = sequence_logps(full, sep["labels"])
        logps = scored_logps(scored_logits(model, batch), batch)
    torch.testing.assert_close(torch.cat([logps.chosen, logps.rejected]), expected.sum, atol=1e-5, rtol=1e-5)


def test_layout_is_chosen_once_from_the_model_class_and_strategy(tiny_model):
    """auto: padding-free on the attention interface, shared_prefix off it, separate under FSDP2 or
    for SFT; an explicit layout the model or strategy can't run is refused by name."""
    from dpo.models.forward import LayoutError, choose_layout

    gpt2, config = type(tiny_model), tiny_model.config

    class OldStyle(gpt2):
        _supports_attention_backend = False  # a model whose attention bypasses transformers' interface

    def choose(requested, cls=gpt2, sharded=False, pairs=True):
        return choose_layout(Layout(requested), cls, config, sharded=sharded, pairs=pairs)

    assert choose("auto") == Layout.padding_free
    assert choose("auto", OldStyle) == Layout.shared_prefix
    assert choose("auto", sharded=True) == Layout.separate
    assert choose("padding_free", pairs=False) == Layout.separate
    assert choose("shared_prefix", OldStyle) == Layout.shared_prefix
    with pytest.raises(LayoutError, match="OldStyle doesn't: use data.layout=shared_prefix"):
        choose("padding_free", OldStyle)
    with pytest.raises(LayoutError, match="untested under FSDP2"):
        choose("shared_prefix", sharded=True)


def test_every_layout_counts_the_same_pair_tokens(bpe_tokenizer):
    """``n_tokens`` (what ``train/tokens_per_s`` counts) is the pairs' tokens as two unpadded rows
    each, so layouts that run fewer tokens (the prompt once) report the same work: for every layout
    it equals the separate layout's real tokens, sum over pairs of 2 * prompt + chosen + rejected."""
    pairs, pad = pairs_for(bpe_tokenizer)[0], bpe_tokenizer.pad_token_id
    expected = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    separate = collate(pairs, pad_id=pad)
    assert separate["n_tokens"] == int(separate["attention_mask"].sum()) == expected
    for padding_free in (False, True):
        assert pack_pairs(pairs, pad_id=pad, padding_free=padding_free)["n_tokens"] == expected
    sft = collate(pairs, pad_id=pad, pairs=False)
    assert sft["n_tokens"] == sum(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs)
