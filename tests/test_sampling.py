"""The generation helper's own decode loop against Hugging Face ``generate`` on tiny models:
the same tokens (greedy, and sampled with the same seed: the same random stream), log-probs equal
to a plain forward pass, finished rows leaving the batch, stop strings, and ranks kept in step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from dpo.maths.logprobs import sequence_logps
from dpo.models.completions import completion_batch
from dpo.models.load import ModelConfig, load_policy
from dpo.models.sampling import GenerationConfig, cut_at_eos, generate, left_pad, sample_completions

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 128}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128}
ARCHS = pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=["gpt2", "llama"])
TEXTS = ["The film was", "I", "A slow, careful and rather long opening that", "Worst"]


def build(arch, tokenizer):
    torch.manual_seed(0)
    return load_policy(ModelConfig(None, architecture=arch), tokenizer=tokenizer).eval()


def plain(model, prompts, gen, pad, eos):
    """Hugging Face ``generate`` on the whole left-padded batch, rows cut at ``eos``."""
    ids, mask = left_pad(prompts, pad)
    kwargs = {"eos_token_id": eos} if eos is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **gen.kwargs(), **kwargs)
    return [cut_at_eos(s[ids.shape[1] :], eos, pad) for s in out.tolist()]


def mid_eos(model, prompts, gen, pad):
    """A token that one row draws early and another never: as EOS it ends rows at different steps."""
    torch.manual_seed(0)
    free = plain(model, prompts, gen, pad, None)
    for token in free[0][2:8]:
        if any(token not in row for row in free[1:]):
            return token
    raise AssertionError("no token separates the rows: the fixture prompts need changing")


def same_as_generate(model, prompts, gen, pad, eos):
    torch.manual_seed(0)
    want = plain(model, prompts, gen, pad, eos)
    torch.manual_seed(0)
    got = generate(model, prompts, gen, pad, eos, batch_size=len(prompts))
    return got, want


@ARCHS
def test_greedy_tokens_equal_generate_with_rows_ending_at_different_steps(arch, bpe_tokenizer):
    model = build(arch, bpe_tokenizer)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS]
    gen = GenerationConfig(max_new_tokens=16, temperature=0)
    eos = mid_eos(model, prompts, gen, 0)
    got, want = same_as_generate(model, prompts, gen, 0, eos)
    assert got == want
    assert len(set(map(len, got))) > 1 and got[0][-1] == eos  # rows did end early, at different steps


@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=1, temperature=1.0),
                                 GenerationConfig(max_new_tokens=1, temperature=0.7, top_k=50, top_p=0.9)],
                         ids=["T1", "T0.7-topk-topp"])  # fmt: skip
def test_sampled_tokens_follow_the_warped_softmax(gen, bpe_tokenizer):
    """20000 draws of one prompt's first token: each token's frequency is within 5 binomial standard
    deviations (+1e-4) of its probability under generate's warpers, and no masked token is drawn.
    The draw is an inverse CDF (dpo.models.sampling._pick), not generate's multinomial, so only the
    distribution is compared; a 5-sigma bound over 512 tokens fails by chance with probability below
    1e-3 for any seed, so it holds on any CPU whose rounding moves a draw or two."""
    from dpo.models.sampling import _warpers

    model = build(GPT2, bpe_tokenizer)
    prompt = bpe_tokenizer("The film was")["input_ids"]
    n = 20000
    torch.manual_seed(0)
    got = generate(model, [prompt] * n, gen, 0, None, batch_size=n)
    counts = torch.bincount(torch.tensor([row[0] for row in got]), minlength=model.config.vocab_size).double()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1].float()
    probs = torch.softmax(_warpers(gen)(None, logits.clone()), -1)[0].double()
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * sigma + 1e-4).all()
    assert counts[probs == 0].sum() == 0 and (probs == 0).any() == (gen.top_k > 0)


@ARCHS
def test_a_rows_draws_do_not_depend_on_when_the_others_end(arch, bpe_tokenizer):
    """One uniform per row of the batch every step, ended rows included: with an EOS that ends rows at
    different steps, every row's tokens are its tokens without that EOS, up to where it ends."""
    model = build(arch, bpe_tokenizer)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS]
    gen = GenerationConfig(max_new_tokens=16, temperature=0.7, top_k=50, top_p=0.9)
    torch.manual_seed(0)
    free = generate(model, prompts, gen, 0, None, batch_size=len(prompts))
    eos = next(t for t in free[0][2:8] if any(t not in row for row in free[1:]))
    torch.manual_seed(0)
    got = generate(model, prompts, gen, 0, eos, batch_size=len(prompts))
    assert len(set(map(len, got))) > 1  # rows did end at different steps
    for row, row_free in zip(got, free, strict=True):
        assert row == row_free[: len(row)] and (row[-1] == eos or len(row) == 16)


@ARCHS
def test_sampled_log_probs_equal_a_forward_pass_over_the_sequences(arch, bpe_tokenizer):
    model = build(arch, bpe_tokenizer)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS]
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=40)
    eos = mid_eos(model, prompts, gen, 0)
    torch.manual_seed(1)
    out = sample_completions(model, prompts, gen, 0, eos, batch_size=len(prompts))
    assert [len(lp) for lp in out.logps] == [len(t) for t in out.tokens]
    batch = completion_batch(prompts, out.tokens, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    for i, lps in enumerate(out.logps):
        want = per_token[i][labels[i, 1:] != -100]
        torch.testing.assert_close(torch.tensor(lps), want, atol=1e-5, rtol=1e-5)
    # and their sums are the sequence log-probs the losses use
    total = sequence_logps(logits, labels).sum
    torch.testing.assert_close(torch.tensor([sum(lp) for lp in out.logps]), total, atol=1e-4, rtol=1e-5)


def test_a_stop_string_ends_its_row_and_leaves_the_others_as_they_were(bpe_tokenizer):
    """With a stop string one row draws, that row ends at the step its text first holds it; the other
    rows keep the tokens they draw without it (their random numbers don't move)."""
    model = build(GPT2, bpe_tokenizer)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS]
    free_gen = GenerationConfig(max_new_tokens=20)
    torch.manual_seed(0)
    free = generate(model, prompts, free_gen, 0, None, batch_size=4)
    text = bpe_tokenizer.decode(free[0])
    k = next(i for i in range(3, 20) if "\ufffd" not in (t := bpe_tokenizer.decode(free[0][i : i + 1])) and t.strip())
    stop = bpe_tokenizer.decode(free[0][k : k + 1])
    end = next(j for j in range(1, 21) if stop in bpe_tokenizer.decode(free[0][:j]))
    torch.manual_seed(0)
    got = generate(model, prompts, GenerationConfig(max_new_tokens=20, stop=[stop]), 0, None, batch_size=4,
                   tokenizer=bpe_tokenizer)  # fmt: skip
    assert got[0] == free[0][:end] and stop in text
    for row_free, row in zip(free[1:], got[1:], strict=True):
        seen = next((j for j in range(1, 21) if stop in bpe_tokenizer.decode(row_free[:j])), None)
        assert row == (row_free[:seen] if seen else row_free)


def test_a_lora_policy_samples_with_its_adapter_as_generate_does(bpe_tokenizer):
    """A PEFT-wrapped policy (reference=lora): the adapter is active while sampling, the head still
    runs on the last position only, and the greedy tokens are generate's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(LLAMA, bpe_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter, so that it matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS]
    gen = GenerationConfig(max_new_tokens=12, temperature=0)
    eos = model.config.eos_token_id  # generate stops there whether told or not
    got, want = same_as_generate(model, prompts, gen, 0, eos)
    assert got == want
    with model.disable_adapter():
        assert generate(model, prompts, gen, 0, eos, batch_size=4) != got


def test_batches_are_decoded_in_order_of_the_prompts(bpe_tokenizer):
    """Several batches: each prompt's completion comes back in its own place, and greedy decoding of
    a prompt doesn't depend on the batch it shares (up to float rounding on this tiny model)."""
    model = build(LLAMA, bpe_tokenizer)
    prompts = [bpe_tokenizer(t)["input_ids"] for t in TEXTS * 2]
    gen = GenerationConfig(max_new_tokens=8, temperature=0)
    one_by_one = [generate(model, [p], gen, 0, None)[0] for p in prompts]
    assert generate(model, prompts, gen, 0, None, batch_size=3) == one_by_one


def _synced_worker(rank: int, world: int, port: str, bpe_tokenizer, counts) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build(GPT2, bpe_tokenizer)
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        prompt = bpe_tokenizer(TEXTS[rank])["input_ids"]
        gen = GenerationConfig(max_new_tokens=10)
        torch.manual_seed(rank)
        # rank 0's EOS is the token it draws first, so its only row ends at once
        eos = generate(model, [prompt], GenerationConfig(max_new_tokens=1), 0, None)[0][0] if rank == 0 else None
        calls.clear()
        torch.manual_seed(rank)
        tokens = generate(model, [prompt], gen, 0, eos, synced_gpus=True)[0]
        counts[rank] = (len(calls), len(tokens))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_synced_ranks_run_the_same_number_of_forward_passes(bpe_tokenizer):
    """Rank 0's row ends at its first token, rank 1's runs all 10: both ranks still call the model
    10 times (a prefill and 9 steps), as FSDP's weight gathers need."""
    counts = mp.Manager().dict()
    mp.spawn(_synced_worker, args=(2, "29533", bpe_tokenizer, counts), nprocs=2)
    assert counts[0] == (10, 1) and counts[1] == (10, 10)


@ARCHS
def test_packed_weights_compute_the_layers_products_and_are_restored(arch, bpe_tokenizer):
    """While decoding on a CPU, every nn.Linear (GPT-2: Conv1D) multiplies with its weight packed for oneDNN
    (dpo.models.packed): the logits equal the plain layers' to float rounding (1e-5 relative:
    another kernel's summation order over 32-64 products), and the layers are plain again after."""
    from dpo.models.packed import _is_linear, packed_linears

    model = build(arch, bpe_tokenizer)
    ids, mask = left_pad([bpe_tokenizer(t)["input_ids"] for t in TEXTS], 0)
    linears = [m for m in model.modules() if _is_linear(m)]
    assert len(linears) >= 2 * 4 + 1, "each block's attention and MLP, and the head"
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with packed_linears(model, len(TEXTS)) as packed:
            assert packed and all("forward" in vars(m) for m in linears)
            got = model(input_ids=ids, attention_mask=mask).logits
        assert not any("forward" in vars(m) for m in linears)
        again = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want)


def test_packing_stays_off_under_autocast_and_for_other_dtypes(bpe_tokenizer):
    """Under autocast nn.Linear multiplies in the autocast dtype and the packed product would not;
    fp16 weights have no packed CPU kernel here: both decode with the plain layers."""
    from dpo.models.packed import packed_linears

    model = build(GPT2, bpe_tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model, 4) as packed:
        assert not packed
    with packed_linears(model.half(), 4) as packed:
        assert not packed
