"""GPU acceptance check: what a GPU user's first commands rely on, measured on the GPU, as one JSON.

    bash experiments/gpu_check/run.sh                       # on one GPU, no network: < 4 minutes
    python experiments/gpu_check/gpu_check.py --smoke       # the same checks, smaller, on the CPU (the suite)

Checks (models built from a config; the bundled reviews; nothing downloaded):

* ``trajectory``: `dpo-train experiment=tiny` under ``trainer=gpu`` (bf16-mixed, the default fused
  AdamW, clipping on) and the same run in 32-true: the loss of every step, step 1 = ln 2 in both,
  and the largest gap between them (:data:`TRAJECTORY_TOL`).
* ``fsdp``: `trainer=fsdp` on one device (FSDP2 through ModelParallelStrategy, bf16-mixed): trains
  with finite losses, its first loss is ln 2.
* ``layouts``: summed response log-probs of the padding-free layout (segment attention) equal the
  separate layout's on the device, in fp32 and under bf16 autocast (:data:`LAYOUT_TOL`).
* ``sampling``: tokens per second of the project's decode loop (batch 16 and 64, T 1), with the
  greedy tokens equal to transformers' ``generate``.
* ``memory``: peak memory of each check (CUDA's ``max_memory_allocated``; on CPU the process's peak RSS).

Exit status 0 when every check passes. Dependencies beyond torch, lightning and transformers are
pure-Python wheels (hydra-core, omegaconf, antlr4): run.sh installs them from a folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

LN2 = math.log(2)
# bf16-mixed against fp32 over a short run of the tiny model at lr 5e-4: bf16 rounds the matmul inputs
# (relative error 2^-9 each), logits and log-softmax stay fp32; the gap grows with the steps as the
# weights drift apart, and stays far below the loss's own move (~0.1 to 0.3 over these steps).
TRAJECTORY_TOL = 0.02
# Same weights, same precision, two layouts, sums over ~100 response tokens of log-probs near -7: fp32
# agrees to its rounding (measured 0 on CPU); bf16 autocast rounds each GEMM's inputs (2^-9 relative)
# and the kernels differ per shape (padded rows against one packed row): measured 4e-3 on CPU, and
# 0.1 leaves room for GPU kernels while a masking or position bug moves a sum by whole nats.
LAYOUT_TOL = {"float32": 1e-3, "bfloat16": 0.1}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_losses(overrides: list[str], out: Path) -> list[float]:
    """`dpo-train` with ``overrides`` in this process; the logged training loss of every step."""
    from hydra import compose, initialize_config_dir

    from dpo.commands.cli import CONF_DIR
    from dpo.commands.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = str(out)
    cfg.paths.cache_dir = str(out.parent / "cache")
    train(cfg)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def run_overrides(accelerator: str, steps: int) -> list[str]:
    return ["experiment=tiny", "logger=csv", f"trainer.accelerator={accelerator}", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", "++trainer.limit_val_batches=2", "data.batch_size=16",
            "data.micro_batch_size=16", "callbacks.samples=null", "callbacks.model_checkpoint.every_n_train_steps=null",
            "+trainer.enable_progress_bar=false"]  # fmt: skip


def check_trajectory(device: torch.device, steps: int, work: Path) -> dict:
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    base = run_overrides(accelerator, steps)
    bf16 = train_losses([*base, "trainer=gpu", f"trainer.accelerator={accelerator}"], work / "bf16")
    fp32 = train_losses([*base, "trainer.precision=32-true"], work / "fp32")
    gap = max(abs(a - b) for a, b in zip(bf16, fp32, strict=True))
    ok = len(bf16) == len(fp32) == steps and abs(bf16[0] - LN2) < 1e-6 and abs(fp32[0] - LN2) < 1e-6
    return {"bf16_mixed": bf16, "fp32": fp32, "max_gap": gap, "tolerance": TRAJECTORY_TOL,
            "pass": bool(ok and gap <= TRAJECTORY_TOL and all(map(math.isfinite, bf16)))}  # fmt: skip


def check_fsdp(device: torch.device, steps: int, work: Path) -> dict:
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    losses = train_losses([*run_overrides(accelerator, steps), "trainer=fsdp", f"trainer.accelerator={accelerator}",
                           "trainer.devices=1"], work / "fsdp")  # fmt: skip
    ok = len(losses) == steps and all(map(math.isfinite, losses)) and abs(losses[0] - LN2) < 1e-6
    return {"losses": losses, "pass": bool(ok)}


def tiny_model_and_pairs(device: torch.device, n_layer: int, n_embd: int):
    """A GPT-2 built from a config (BPE trained on the bundled reviews) and 8 tokenized pairs."""
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec, bundled_path
    from dpo.data.tokenize import PairTokenizer
    from dpo.models.load import ModelConfig, load_policy, train_bpe_tokenizer

    path = bundled_path("reviews_val.jsonl")
    rows = load_rows(SourceSpec("fields", {"train": path, "val": path}, None, max_rows=64), "train")[0]
    tokenizer = train_bpe_tokenizer([t for r in rows for t in (r.prompt, r.chosen, r.rejected)], vocab_size=1024)
    torch.manual_seed(0)
    arch = {"model_type": "gpt2", "n_layer": n_layer, "n_head": 4, "n_embd": n_embd, "n_positions": 512}
    model = load_policy(ModelConfig(None, architecture=arch), tokenizer=tokenizer).to(device).eval()
    pairs = [PairTokenizer(tokenizer, 256, 128)(r) for r in rows[:8]]
    return model, tokenizer, pairs


def check_layouts(device: torch.device) -> dict:
    from dpo.data.collate import collate
    from dpo.data.packing import pack_pairs
    from dpo.models.attention import NAME as SEGMENT_ATTENTION
    from dpo.models.forward import score_pairs

    model, tokenizer, pairs = tiny_model_and_pairs(device, 2, 128)
    pad = tokenizer.pad_token_id
    out = {}
    for dtype in ("float32", "bfloat16"):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            model.set_attn_implementation("sdpa")
            sep, _ = score_pairs(model, {k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in collate(pairs, pad_id=pad).items()})  # fmt: skip
            model.set_attn_implementation(SEGMENT_ATTENTION)
            packed = pack_pairs(pairs, pad_id=pad, padding_free=True)
            pf, _ = score_pairs(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()})
        gap = max(float((sep.chosen - pf.chosen).abs().max()), float((sep.rejected - pf.rejected).abs().max()))
        out[dtype] = {"max_abs_gap": gap, "tolerance": LAYOUT_TOL[dtype], "pass": gap <= LAYOUT_TOL[dtype]}
    out["pass"] = all(v["pass"] for v in out.values())
    return out


def check_sampling(device: torch.device, batches: tuple[int, ...], new_tokens: int) -> dict:
    from dpo.models.sampling import GenerationConfig, generate

    model, tokenizer, pairs = tiny_model_and_pairs(device, 4, 256)
    model.set_attn_implementation("sdpa")
    pad = tokenizer.pad_token_id
    out: dict = {}
    for batch in batches:
        prompts = [pairs[i % len(pairs)].prompt_ids for i in range(batch)]
        gen = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0)
        generate(model, prompts, gen, pad, None, batch_size=batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        completions = generate(model, prompts, gen, pad, None, batch_size=batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        out[f"batch_{batch}"] = {"tokens_per_s": sum(map(len, completions)) / seconds, "seconds": seconds}
    # Greedy tokens equal transformers' generate (no EOS, so every row runs to the limit).
    prompts = [pairs[i].prompt_ids for i in range(4)]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0), pad, None,
                    batch_size=4)  # fmt: skip
    theirs = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=None)  # fmt: skip
        theirs.append(full[0, len(p) :].tolist())
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    out["greedy_rows_equal_generate"] = f"{same}/{len(prompts)}"
    out["pass"] = same == len(prompts) and all(v["tokens_per_s"] > 0 for k, v in out.items() if k.startswith("batch"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small, on the CPU: the suite's run of this script")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON of results")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temp folder)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible; on a CPU run it with --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = 4 if args.smoke else 20
    import lightning
    import transformers

    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "mode": "smoke (CPU)" if args.smoke else "full",
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }  # fmt: skip
    started = time.perf_counter()
    checks = {
        "trajectory": lambda: check_trajectory(device, steps, work),
        "fsdp": lambda: check_fsdp(device, 2 if args.smoke else 10, work),
        "layouts": lambda: check_layouts(device),
        "sampling": lambda: check_sampling(device, (4,) if args.smoke else (16, 64), 8 if args.smoke else 64),
    }
    for name, check in checks.items():
        reset_peak(device)
        t = time.perf_counter()
        try:
            result[name] = check()
        except Exception as e:  # a check that crashes fails, and the others still run
            result[name] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
        result[name]["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        print(f"gpu_check {name}: {'pass' if result[name]['pass'] else 'FAIL'} ({result[name]['seconds']} s)",
              flush=True)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["pass"] = all(result[name]["pass"] for name in checks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check: {'all checks pass' if result['pass'] else 'FAILED'}; results in {args.out}")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
