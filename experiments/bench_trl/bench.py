"""Benchmark: a DPO step of dpo-train against TRL's DPOTrainer on identical work.

    pip install -e ".[bench]"
    python experiments/bench_trl/bench.py --reps 3        # 7M and 30M GPT-2, TRL (default, best, lean) vs ours
    python experiments/bench_trl/bench.py --sizes 7m --steps 6 --reps 1   # quick look

Both trainers get the same model (a GPT-2 built from a config, saved once), the same synthetic
pairs (prompts 64-192 tokens, responses 32-128, fixed seed) as text that a word-level tokenizer
maps one word to one id (so both tokenize identically), batch 8 pairs, AdamW lr 1e-5 constant,
clipping 1.0, sequential order, fp32 unless a variant says otherwise. Best meets best: trl_best is
TRL at its fastest (gradient checkpointing off, which TRL 1.16 turns on by default; bf16 exactly
where ours_fast takes it), trl_lean TRL at its leanest for the memory column. Each variant runs in its own
process (peak RSS is that process's); the order of the variants alternates between repetitions
and ratios are taken within a repetition, so machine noise cancels. MFU counts the standard
layout's FLOPs (6 N per trained token + 2 N per reference token) against this machine's fp32 GEMM
rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"7m": {"n_layer": 6, "n_embd": 256, "n_head": 4}, "30m": {"n_layer": 8, "n_embd": 512, "n_head": 8}}
VOCAB, BATCH, LR, CLIP, BETA = 8192, 8, 1e-5, 1.0, 0.1
VARIANTS = {
    "trl": "TRL DPOTrainer, its defaults (gradient checkpointing on) except fp32 (live reference copy)",
    "trl_best": "TRL DPOTrainer at its CPU best: precompute_ref_log_probs (batch 32), dataset_num_proc=2, "
    "gradient checkpointing off, bf16 where ours_fast gets it",
    "trl_lean": "TRL DPOTrainer at its leanest (the memory row): precompute_ref_log_probs, gradient checkpointing on",
    "ours_separate": "dpo-train in TRL's layout: chosen and rejected rows, live reference, fp32",
    "ours_shared": "dpo-train, shared_prefix layout (one padded row per pair, 4D mask), live reference, fp32",
    "ours_exact": "dpo-train defaults, fp32, every approximation off: padding-free prefix sharing, live reference",
    "ours_fast": "dpo-train fast: defaults + precomputed reference (+ bf16 autocast where bf16 GEMM is faster)",
}
DEFAULT_VARIANTS = ["trl", "trl_best", "trl_lean", "ours_separate", "ours_exact", "ours_fast"]
# TRL 1.16's DPOConfig speed options, and why trl_best takes or leaves each on a CPU:
#   precompute_ref_log_probs (+ precompute_ref_batch_size)  taken: one reference pass before training
#   dataset_num_proc                                         taken: parallel tokenization (start time only)
#   gradient_checkpointing                                   off: TRL 1.16 turns it on by default (BaseConfig);
#                                                            it recomputes every activation in the backward
#   bf16                                                     as ours_fast: on where bf16 GEMM beats fp32
#   disable_dropout                                          already on by default
#   padding_free                                             off in 1.16: it warns and pads (dpo_trainer.py)
#   pad_to_multiple_of                                       pads more: only for tensor-core shapes on GPUs
#   activation_offloading                                    a memory lever (GPU), slower steps
#   use_liger_kernel                                         Triton kernels: GPU only
TRL = {
    "trl": {"gradient_checkpointing": True},  # TRL's default, written down
    "trl_best": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 32, "dataset_num_proc": 2,
                 "gradient_checkpointing": False},
    "trl_lean": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 32, "gradient_checkpointing": True},
}
"""DPOConfig options of each TRL variant (on top of the shared settings in :func:`run_trl`)."""
OURS = {
    "ours_separate": ["data.layout=separate"],
    "ours_shared": ["data.layout=shared_prefix"],
    "ours_exact": [],
    "ours_fast": ["reference=precomputed"],
}
BF16 = ["trainer.precision=bf16-mixed"]


def make_assets(work: Path, n_pairs: int, seed: int = 0, sizes: dict[str, dict] | None = None) -> None:
    """Word-level tokenizer, synthetic pairs and one random-init model per size, written once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1} | {f"t{i}": i for i in range(2, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"t{rng.randrange(2, VOCAB)}" for _ in range(rng.randint(lo, hi)))

    rows = [
        {"prompt": words(64, 192), "chosen": " " + words(32, 128), "rejected": " " + words(32, 128)}
        for _ in range(n_pairs)
    ]
    with (work / "pairs.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (work / "val.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:BATCH])
    for size, shape in (sizes or SIZES).items():
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **shape,
        )
        GPT2LMHeadModel(config).save_pretrained(work / size)
        tokenizer.save_pretrained(work / size)


def tokens_per_step(work: Path, steps: int) -> list[int]:
    """Non-pad tokens of the chosen and rejected rows (prompt + response + EOS, each row) per step."""
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    count = [2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2 for r in rows]
    return [sum(count[s * BATCH : (s + 1) * BATCH]) for s in range(steps)]


def run_trl(work: Path, size: str, steps: int, options: dict | None = None, bf16: bool = False) -> dict:
    """TRL's DPOTrainer for ``steps`` steps with the shared settings, ``options`` (DPOConfig fields) on top."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work / size)
    tokenizer = AutoTokenizer.from_pretrained(work / size)
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    times, losses, first = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()
            first.append(self.t - started)

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    class Recorder(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append((out[0] if return_outputs else out).item())
            return out

    args = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=CLIP,
        weight_decay=0.0,
        beta=BETA,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=bf16,  # TRL defaults to bf16 autocast: on CPUs without bf16 GEMM units it is ~100x slower
        **(options or {}),
    )
    Recorder(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    ).train()
    return {"times": times, "losses": losses, "start": first[0]}


def run_ours(work: Path, size: str, steps: int, levers: list[str]) -> dict:
    import csv

    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir

    from dpo.commands.cli import CONF_DIR
    from dpo.commands.train import train

    times, first = [], []
    started = time.perf_counter()

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.t = time.perf_counter()
            first.append(self.t - started)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.t)

    out = work / "ours_out" / f"{size}-{os.getpid()}"
    overrides = [
        "experiment=tiny", "model=hf", f"model.pretrained={work / size}",
        "data=local", f"data.source.splits.train={work / 'pairs.jsonl'}",
        f"data.source.splits.val={work / 'val.jsonl'}", f"data.batch_size={BATCH}", f"data.micro_batch_size={BATCH}",
        f"data.eval_batch_size={BATCH}", "data.max_length=512", "data.max_prompt_length=256", "data.shuffle=false",
        f"optim.optimizer.lr={LR}", "optim.warmup_steps=0", f"trainer.gradient_clip_val={CLIP}", f"loss.beta={BETA}",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "logger=csv",
        "callbacks=none", "+trainer.enable_progress_bar=false", f"paths.cache_dir={work / 'cache'}", *levers,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = str(out)
    train(cfg, extra_callbacks=[Timer()])
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {"times": times, "losses": losses, "start": first[0]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    bf16 = args.bf16 == "on"
    levers = OURS.get(args.variant, []) + (BF16 if args.variant == "ours_fast" and bf16 else [])
    if args.variant in TRL:
        result = run_trl(work, args.size, args.steps, TRL[args.variant], bf16=bf16 and args.variant == "trl_best")
    else:
        result = run_ours(work, args.size, args.steps, levers)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def gemm_rate(threads: int, dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """Matmul FLOP/s of this machine with ``threads`` threads in ``dtype``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def machine() -> str:
    """This machine's CPU model and whether it has bf16 GEMM instructions (avx512_bf16 / amx_bf16)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "unknown CPU")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info.split()]
    return f"{model}, {os.cpu_count()} cores, bf16 instructions: {', '.join(flags) or 'none'}"


def n_params(work: Path, size: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(work / size).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (first 2 not counted)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions; variant order alternates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for assets and outputs (default: a temp folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast in ours_fast and trl_best: auto = where bf16 GEMM is 1.25x fp32's or more")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    work = Path(args.work or tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    make_assets(work, n_pairs=BATCH * args.steps)
    flops_rate = gemm_rate(args.threads)
    bf16_rate = gemm_rate(args.threads, "bfloat16")
    # bf16 autocast is a lever only where the CPU has bf16 GEMM units that beat fp32 clearly (a tie
    # under noise would flip the choice between runs).
    use_bf16 = {"on": True, "off": False}.get(args.bf16, bf16_rate >= 1.25 * flops_rate)
    tokens = tokens_per_step(work, args.steps)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    results: dict[tuple[str, str, int], dict] = {}
    for rep in range(args.reps):
        order = args.variants if rep % 2 == 0 else list(reversed(args.variants))
        for size in args.sizes:
            for variant in order:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"--work={work}",
                    f"--variant={variant}",
                    f"--size={size}",
                    f"--steps={args.steps}",
                    f"--threads={args.threads}",
                ]
                cmd += [f"--bf16={'on' if use_bf16 else 'off'}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{variant} {size} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
                results[(variant, size, rep)] = json.loads(line[len("RESULT ") :])

    print(f"\nMachine: {machine()}")
    print(
        f"GEMM rate: fp32 {flops_rate / 1e9:.1f}, bf16 {bf16_rate / 1e9:.1f} GFLOP/s ({args.threads} threads): "
        f"bf16 autocast {'on' if use_bf16 else 'off'} in ours_fast and trl_best"
    )
    print(f"{args.steps} steps, median of steps 3..{args.steps}; batch {BATCH} pairs; {args.reps} repetitions\n")
    header = (
        f"{'size':<5} {'variant':<13} {'step s':>7} {'start s':>7} {'tokens/s':>8} {'peak RSS MB':>11} {'MFU %':>6} "
        f"{'x TRL (per rep)':>16} {'x TRL best (per rep)':>21} {'max |loss - TRL|':>16}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        n = n_params(work, size)
        for variant in args.variants:
            per_rep, starts = [], []
            ratios: dict[str, list[float]] = {"trl": [], "trl_best": []}
            for rep in range(args.reps):
                r = results[(variant, size, rep)]
                median = statistics.median(r["times"][2:])
                per_rep.append((median, r["peak_rss_mb"]))
                starts.append(r["start"])
                for base in ratios:
                    if base in args.variants:
                        ratios[base].append(statistics.median(results[(base, size, rep)]["times"][2:]) / median)
            step = statistics.median(m for m, _ in per_rep)
            tok = statistics.median(tokens[2:])
            mfu = 100 * (8 * n * tok) / step / flops_rate
            diff = ""
            if "trl" in args.variants:
                ours, theirs = results[(variant, size, 0)]["losses"], results[("trl", size, 0)]["losses"]
                diff = f"{max(abs(a - b) for a, b in zip(ours, theirs, strict=True)):.2e}"

            def show(xs: list[float]) -> str:
                return " ".join(f"{x:.2f}" for x in xs) + (f" ={statistics.median(xs):.2f}" if len(xs) > 2 else "")

            print(
                f"{size:<5} {variant:<13} {step:>7.3f} {statistics.median(starts):>7.1f} {tok / step:>8.0f} "
                f"{max(r for _, r in per_rep):>11.0f} {mfu:>6.1f} {show(ratios['trl']):>16} "
                f"{show(ratios['trl_best']):>21} {diff:>16}"
            )
    print()
    for variant in args.variants:
        print(f"  {variant:<13} {VARIANTS[variant]}")
    print(
        "\nstart s: from the trainer's start to its first step (model load, tokenization, ours: a first "
        "validation pass and, for ours_fast, the reference pass over the whole data set)"
    )


if __name__ == "__main__":
    main()
