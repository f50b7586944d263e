"""Peak memory and step time of a DPO step at a 128k vocabulary: the full logits, the tiles, TRL.

The same work for every variant (``experiments/bench_trl``'s harness: a GPT-2 built from a config,
synthetic pairs with prompts of 64-192 and responses of 32-128 tokens, word-level tokens, batch 8
pairs, AdamW 1e-5, clipping 1.0, fp32 on the CPU), with a vocabulary of 131072 entries (Llama 3's is
128256, Qwen 2.5's 151936) on a small trunk, so the logits are the largest tensor of the step. Each
variant runs in its own process; its peak is the process's peak resident memory (``ru_maxrss``),
its step time the median of the timed steps.

    python experiments/bench_memory/bench.py                    # every variant, 6 steps, the table
    python experiments/bench_memory/bench.py --variants ours_full ours_tiled --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench_trl"))
import bench as harness  # noqa: E402  (experiments/bench_trl/bench.py)

VOCAB = 131072
SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4}
VARIANTS = {
    "ours_full": "dpo-train defaults with the full logits at the scored positions (the layout before the tiles)",
    "ours_tiled": "dpo-train defaults: log-probs through the head in tiles (dpo.maths.tiled)",
    "ours_lean": "dpo-train at its leanest: tiles + gradient checkpointing + reference=precomputed",
    "trl": "TRL 1.16 DPOTrainer, its defaults (fused LM head, gradient checkpointing on, live reference)",
    "trl_lean": "TRL at its leanest: its defaults + precompute_ref_log_probs",
    "trl_nogc": "TRL with its defaults but gradient checkpointing off",
}
TRL = {
    "trl": {"gradient_checkpointing": True},
    "trl_lean": {"gradient_checkpointing": True, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 8},
    "trl_nogc": {"gradient_checkpointing": False},
}
OURS = {
    "ours_full": [],
    "ours_tiled": [],
    "ours_lean": ["model.gradient_checkpointing=true", "reference=precomputed"],
}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    harness.VOCAB = VOCAB
    work = Path(args.work)
    if args.variant == "ours_full":
        import dpo.maths.tiled

        dpo.maths.tiled.TILE_ELEMENTS = 1 << 62  # never tile: the full logits, as before the tiles
    if args.variant in TRL:
        result = harness.run_trl(work, "m", args.steps, TRL[args.variant])
    else:
        result = harness.run_ours(work, "m", args.steps, OURS[args.variant])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first 2 not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    harness.VOCAB = VOCAB
    if not (work / "m").is_dir():
        harness.make_assets(work, n_pairs=harness.BATCH * args.steps, sizes={"m": SHAPE})
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--work", str(work),
               "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{run.stderr[-4000:]}")
        results[variant] = json.loads(line[7:])
        print(f"{variant}: done", file=sys.stderr)
    print(harness.machine())
    print(f"GPT-2 trunk {SHAPE}, vocabulary {VOCAB}; batch {harness.BATCH} pairs; fp32; {args.steps} steps, "
          f"median of steps 3..{args.steps}")  # fmt: skip
    base = results.get("ours_full")
    header = f"{'variant':<12} {'peak RSS MB':>11} {'x ours_full':>11} {'step s':>7} {'x ours_full':>11}  losses"
    print(header + "\n" + "-" * len(header))
    for variant, r in results.items():
        step = statistics.median(r["times"][2:] or r["times"])
        mem_ratio = base["peak_rss_mb"] / r["peak_rss_mb"] if base else float("nan")
        time_ratio = statistics.median(base["times"][2:] or base["times"]) / step if base else float("nan")
        losses = " ".join(f"{x:.6f}" for x in r["losses"][:3])
        peak = r["peak_rss_mb"]
        print(f"{variant:<12} {peak:>11.0f} {mem_ratio:>10.2f}x {step:>7.3f} {time_ratio:>10.2f}x  {losses}")
    print()
    for variant in results:
        print(f"  {variant:<12} {VARIANTS[variant]}")


if __name__ == "__main__":
    main()
