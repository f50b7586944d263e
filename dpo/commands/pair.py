"""`dpo-pair`: preference pairs from scored samples, all pairs among each prompt's completions.

    dpo-pair input=scored.jsonl min_margin=0.1 ties=skip
    dpo-train data=imdb_pairs data.source.splits.train=<out>/train.jsonl data.source.splits.val=<out>/val.jsonl

With k completions per prompt there are k(k-1)/2 candidate pairs (the paper: 4 samples, 6 pairs).
A pair is dropped when the completions are identical or one is empty, or when the reward gap is
below ``min_margin``; an exact tie follows ``ties`` (``skip``, or ``random``: a seeded coin picks
the chosen one). Prompts are split into train and val (no prompt in both).
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations
from pathlib import Path

from omegaconf import DictConfig

from dpo.commands.cli import entry
from dpo.config.schema import PairConfig
from dpo.config.settings import ConfigError, check_ranges, require_keys
from dpo.runtime.io import DataError, finite_numbers, read_jsonl, write_json, write_jsonl
from dpo.runtime.log import get_logger

log = get_logger(__name__)
TIES = ("skip", "random")


def make_pairs(
    completions: list[str], rewards: list[float], min_margin: float, ties: str, rng: random.Random, counts: Counter
) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` index pairs among one prompt's completions; ``counts`` tallies drops.

    Args:
        completions: the prompt's k completions.
        rewards: their rewards.
        min_margin: the smallest reward gap kept (>= 0); a gap below it is dropped.
        ties: what an exact tie does when ``min_margin`` is 0: ``skip`` or ``random``.
        rng: picks the order of a tie under ``ties=random``.
        counts: incremented under ``kept``, ``identical``, ``empty``, ``below_margin``, ``tie``.
    """
    if ties not in TIES:
        raise ConfigError(f"ties must be one of {TIES}, got {ties!r}")
    if min_margin < 0:
        raise ConfigError(f"min_margin must be >= 0, got {min_margin}")
    out = []
    for i, j in combinations(range(len(completions)), 2):
        gap = rewards[i] - rewards[j]
        if not completions[i].strip() or not completions[j].strip():
            counts["empty"] += 1
        elif completions[i] == completions[j]:
            counts["identical"] += 1
        elif abs(gap) < min_margin:
            counts["below_margin"] += 1
        elif gap == 0 and ties == "skip":
            counts["tie"] += 1
        else:
            if gap == 0:
                counts["tie_random"] += 1
                first = rng.random() < 0.5
            else:
                first = gap > 0
            out.append((i, j) if first else (j, i))
            counts["kept"] += 1
    return out


DROPS = {
    "identical": "were identical completions (sample with temperature > 0, or more of them: n)",
    "empty": "had an empty completion (raise generation.max_new_tokens, or check the stop strings)",
    "below_margin": "had a reward gap below min_margin={margin:g} (lower min_margin)",
    "tie": "were exact reward ties, skipped under ties=skip (ties=random keeps them in a random order)",
}


def why_no_pair(counts: Counter, min_margin: float) -> str:
    """What dropped every candidate pair, the largest cause first, with the fix for each."""
    causes = [f"{n} {DROPS[k].format(margin=min_margin)}" for k, n in counts.most_common() if k in DROPS and n]
    return "; ".join(causes) or "no prompt has two completions to compare"


def pair(cfg: DictConfig) -> Path:
    """Run the pairing step; returns the output folder holding ``train.jsonl`` and ``val.jsonl``."""
    require_keys(cfg, ["input", "output_dir", "min_margin", "ties", "val_fraction"])
    check_ranges(cfg, PairConfig)  # min_margin >= 0, ties, val_fraction in [0, 1), all at once
    rows = read_jsonl(cfg.input, {"prompt": str, "completions": list, "rewards": list})
    for i, row in enumerate(rows, 1):
        if len(row["rewards"]) != len(row["completions"]):
            raise DataError(
                f"{cfg.input}:{i}: {len(row['completions'])} completions but {len(row['rewards'])} rewards"
            )
        row["rewards"] = finite_numbers(row["rewards"], f"{cfg.input}:{i}", "rewards")  # Infinity was written out
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_val = round(len(rows) * cfg.val_fraction)
    val_rows = set(order[:n_val])
    counts: Counter = Counter()
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for i, row in enumerate(rows):
        for c, r in make_pairs(row["completions"], row["rewards"], cfg.min_margin, cfg.ties, rng, counts):
            splits["val" if i in val_rows else "train"].append({
                "prompt": row["prompt"], "chosen": row["completions"][c], "rejected": row["completions"][r],
                "chosen_reward": row["rewards"][c], "rejected_reward": row["rewards"][r],
            })  # fmt: skip
    if not splits["train"]:
        raise DataError(f"{cfg.input}: no training pair survived: {why_no_pair(counts, cfg.min_margin)}")
    out = Path(cfg.output_dir)
    for split, items in splits.items():
        write_jsonl(out / f"{split}.jsonl", items)
    write_json(out / "pairs.meta.json", {
        "input": str(cfg.input), "min_margin": cfg.min_margin, "ties": cfg.ties, "seed": cfg.seed,
        "prompts": {"train": len(rows) - n_val, "val": n_val},
        "pairs": {k: len(v) for k, v in splits.items()}, "counts": dict(counts),
    })  # fmt: skip
    log.info(f"pairs: train {len(splits['train'])}, val {len(splits['val'])}; {dict(counts)} -> {out}")
    return out


@entry("pair")
def main(cfg: DictConfig) -> None:
    pair(cfg)


if __name__ == "__main__":
    main()
