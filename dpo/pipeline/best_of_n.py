"""`dpo-best-of-n`: the Best-of-N baseline from scored samples of the SFT model (no training).

    dpo-best-of-n input=<scored samples of the SFT model on held-out prompts> ns=[1,2,4,8,16]

For each N, the reward of the best of a prompt's first N samples, averaged over prompts, against
the KL of the best-of-N policy to the sampling policy, ``log N - (N - 1) / N`` (Stiennon et al.
2020, arXiv 2009.01325, App. G.3; exact for distinct samples, an upper bound otherwise). One row
per N goes to ``<output>`` in the evaluation format the frontier script reads.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from dpo.cli import entry
from dpo.config import ConfigError, require_keys
from dpo.io import read_jsonl, write_jsonl
from dpo.log import get_logger
from dpo.progress import track

log = get_logger(__name__)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: list[list[float]], n: int) -> tuple[float, list[int]]:
    """Mean over prompts of the best reward among the first ``n`` samples, and each prompt's pick."""
    picks = []
    for i, r in enumerate(rewards):
        if len(r) < n:
            raise ValueError(f"prompt {i} has {len(r)} samples, fewer than N={n}")
        picks.append(max(range(n), key=lambda j: r[j]))
    return sum(r[j] for r, j in zip(rewards, picks, strict=True)) / len(rewards), picks


def run(cfg: DictConfig) -> Path:
    require_keys(cfg, ["input", "ns", "output"])
    rows = read_jsonl(cfg.input, {"rewards": list})
    if any(n < 1 for n in cfg.ns):
        raise ConfigError(f"ns must be positive, got {list(cfg.ns)}")
    out = []
    for n in track(cfg.ns, "best-of-n"):
        mean, _ = best_of_n([r["rewards"] for r in rows], n)
        out.append(
            {"method": "best_of_n", "n": n, "step": 0, "reward": mean, "kl": best_of_n_kl(n), "n_prompts": len(rows)}
        )
        log.info(f"best-of-{n}: reward {mean:.4f}, KL {best_of_n_kl(n):.3f}")
    return write_jsonl(cfg.output, out)


@entry("best_of_n")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
