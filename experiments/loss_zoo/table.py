"""The loss zoo's table: one row per run folder of ``run.sh``.

    python experiments/loss_zoo/table.py outputs/loss_zoo --out experiments/loss_zoo/results.md

Per run: the loss and its settings (``config.yaml``), the held-out preference metrics at the end
(``run.json``: implicit-reward accuracy and margin, in each loss's own reward units; KTO's: the
completions whose reward sits on their label's side of its KL reference point, and the signed
distance; and the teacher-forced KL on the chosen responses), and the held-out generations' ground-truth (VADER)
reward with its standard error over the samples and the exact sequence KL to the reference
(``eval/``), with the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from dpo.maths.losses import MODIFIERS

COLUMNS = ("run", "loss", "reward acc.", "margin", "KL chosen (val)", "GT reward (± s.e.)", "exact KL", "s")


def describe(loss: dict) -> str:
    """The loss's name and every setting away from its default."""
    keep = {k: v for k, v in loss.items() if k != "name" and v is not None and MODIFIERS.get(k, object()) != v
            and not (k == "nll_weight" and v == 0)}  # fmt: skip
    return loss["name"] + "".join(f" {k}={v}" for k, v in keep.items())


def row(run: Path) -> list[str] | None:
    """The table row of a finished run folder, or None."""
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    if info.get("status") != "finished":
        return None
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    kto = config.get("system", {}).get("kind") == "kto"  # a system: its settings, its metric names
    loss = {"name": "kto (system=kto)", **{k: v for k, v in config["system"].items() if k != "kind"}} if kto else (
        config["loss"])
    after = info["after"]
    final = [json.loads(line) for line in (run / "eval" / "eval.jsonl").read_text().splitlines()][-1]
    samples = [json.loads(line) for line in (run / "eval" / f"step{final['step']:06d}.jsonl").read_text().splitlines()]
    rewards = [s["reward"] for s in samples]
    mean = sum(rewards) / len(rewards)
    se = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1) / len(rewards))

    def metric(key: str) -> str:
        return f"{after[key]:.3f}" if key in after else "-"

    group = "val/kto" if kto else "val/rewards"
    held_out = [metric(f"{group}/accuracy"), metric(f"{group}/margin"), metric("val/kl/chosen")]
    generations = [f"{mean:.3f} ± {se:.3f}", f"{final['kl']:.2f}"]
    return [run.name, describe(loss), *held_out, *generations, f"{info['seconds']:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="run.sh's output folder")
    parser.add_argument("--out", type=Path, required=True, help="the markdown table to write")
    args = parser.parse_args()
    rows = [r for r in (row(run) for run in sorted(p for p in args.runs.iterdir() if p.is_dir())) if r]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
