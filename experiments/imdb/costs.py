"""What each point of the IMDB frontier cost: wall time of training and of the data it needed, and the
tokens generated for it (the cost table beside ``frontier.png``; experiment-only, so it lives here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_cost(run_dir: Path) -> dict[str, float] | None:
    """A training run's cost from its ``run.json``: wall seconds and tokens generated to train (PPO's
    rollouts); None without one. Runs from before run.json kept the time: the seconds from
    ``config.yaml``'s writing to ``run.json``'s last one (the same span: start to export)."""
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        return None
    state = json.loads((run_dir / "run.json").read_text())
    seconds = state.get("seconds") or (run_dir / "run.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    return {"seconds": float(seconds), "generated_tokens": float(state.get("generated_tokens", 0))}


RM_FAMILIES = ("PPO", "Online DPO", "Iterative DPO", "GRPO", "RLOO")  # against the reward model learned from the pairs
PAIR_FAMILIES = ("DPO", "Preferred-FT", "Unlikelihood", *RM_FAMILIES)  # on pairs, or a reward model of them


def sampled_tokens(meta: dict) -> int:
    """Upper bound of the tokens a dpo-sample run generated: sequences x max_new_tokens."""
    return int(meta["n"] * meta["n_prompts"] * meta["generation"]["max_new_tokens"])


def cost_table(points: list[dict[str, Any]], pairs_meta: Path, rm_dir: Path | None = None) -> str:
    """A Markdown table: per run, its last evaluation (per N for Best-of-N) and what it cost: wall
    seconds of training, of the data it needed (the pairs' generation, ``pairs_meta``, for methods
    trained on pairs; plus the reward model's training, ``rm_dir``, for PPO; Best-of-N's sampling)
    and the tokens generated for it."""
    pairs = json.loads(pairs_meta.read_text())["samples"] if pairs_meta.is_file() else {"seconds": 0, "n": 0,
                                                                                       "n_prompts": 0}  # fmt: skip
    pair_seconds = pairs["seconds"]
    pair_tokens = sampled_tokens(pairs) if "generation" in pairs else 0
    rm = run_cost(rm_dir) if rm_dir else None  # None: no reward model run given (or found)
    last: dict[str, dict] = {}
    for p in points:
        if p["family"] == "Best-of-N" or p["step"] >= last.get(p["source"], {}).get("step", -1):
            key = f"{p['source']}#{p['step']}" if p["family"] == "Best-of-N" else p["source"]
            last[key] = p
    lines = ["| method | seed | step / N | KL | reward (± s.e.) | training s | data s | generated tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in sorted(last.values(), key=lambda p: (p["family"], p["label"], p["step"], str(p.get("seed")))):
        se = f" ± {p['reward_se']:.3f}" if p.get("reward_se") is not None else ""
        head = f"| {p['label']} | {'-' if p.get('seed') is None else p['seed']} | {p['step']} | {p['kl']:.3f} | "
        if p["family"] == "Best-of-N":
            meta_path = Path(p["source"]).parent / "samples.jsonl.meta.json"
            if not meta_path.is_file():  # the samples' metadata is not beside it: cost unknown
                lines.append(f"{head}{p['reward']:.4f}{se} | 0 | ? | ? |")
                continue
            meta = json.loads(meta_path.read_text())
            n_max = meta["n"]
            train, data = 0.0, meta["seconds"] * p["step"] / n_max  # the first N of n_max samples per prompt
            tokens = f"≤{sampled_tokens(meta) * p['step'] // n_max}"
        else:
            cost = run_cost(Path(p["source"]).parent.parent)
            if cost is None:
                lines.append(f"{head}{p['reward']:.4f}{se} | ? | ? | ? |")
                continue
            train, data, extra = cost["seconds"], 0.0, 0
            if p["family"] in PAIR_FAMILIES:
                data, extra = pair_seconds, pair_tokens
            if p["family"] in RM_FAMILIES and rm is not None:
                data += rm["seconds"]
            gen = int(cost["generated_tokens"])
            tokens = f"{gen + extra}" if not extra else f"≤{gen + extra}"
        lines.append(f"{head}{p['reward']:.4f}{se} | {train:.0f} | {data:.0f} | {tokens} |")
    notes = [
        "",
        f"data s: pair generation ({pair_seconds:.0f} s, dpo-sample of the pairs' {pairs['n_prompts']} openings "
        f"x {pairs['n']}) for the methods trained on pairs"
        + (f"; the RL methods and online/iterative DPO against the reward model add its training "
           f"({rm['seconds']:.0f} s)" if rm else "")
        + "; Best-of-N: sampling N completions per evaluation opening. Tokens marked ≤ are sequences x "
        "max_new_tokens (the starting model's completions use ~31.9 of 32); the tokens sampled in training "
        "(PPO, GRPO, RLOO, online DPO) are counted exactly. Evaluation sampling (the same for every method) "
        "is not counted.",
    ]
    return "\n".join(lines + notes) + "\n"
