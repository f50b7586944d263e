"""`dpo-best-of-n`: the Best-of-N baseline from scored samples of the SFT model (no training).

    dpo-best-of-n input=<scored samples of the SFT model on held-out prompts> ns=[1,2,4,8,16]

For each N, the reward of the best of a prompt's first N samples, averaged over prompts, against
the KL of the best-of-N policy to the sampling policy, ``log N - (N - 1) / N`` (Stiennon et al.
2020, arXiv 2009.01325, App. G.3; exact for distinct samples, an upper bound otherwise). One row
per N goes to ``<output>`` in the evaluation format the frontier script reads.

The paper's TL;DR and HH Best-of-128 baseline picks with a reward model learned from the
preference data: score the samples with it first (``dpo-score reward=learned_rm
reward.path=<reward model run>/hf``), then ``completions=<file>`` writes each prompt's pick for every
N as ``{policy: best_of_<N>, temperature, prompt, completion}`` rows, the format ``dpo-eval
completions=<file>`` judges (the temperature is the samples' own, from their metadata).

    dpo-sample model.pretrained=<sft>/hf data=tldr n=128 output=samples.jsonl
    dpo-score input=samples.jsonl reward=learned_rm reward.path=<rm run>/hf output=scored.jsonl
    dpo-best-of-n input=scored.jsonl ns=[1,4,16,64,128] completions=picks.jsonl
    dpo-eval completions=picks.jsonl data=tldr judge=api
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig

from dpo.commands.cli import entry
from dpo.config.schema import BestOfNConfig
from dpo.config.settings import ConfigError, check_ranges, require_keys
from dpo.runtime.io import DataError, finite_numbers, read_jsonl, write_jsonl
from dpo.runtime.log import get_logger
from dpo.runtime.progress import track

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
    check_ranges(cfg, BestOfNConfig)  # ns: a non-empty list of whole numbers >= 1
    rows = read_jsonl(cfg.input, {"rewards": list})
    for i, row in enumerate(rows, 1):  # NaN rewards were accepted here (dpo-pair refused them)
        row["rewards"] = finite_numbers(row["rewards"], f"{cfg.input}:{i}", "rewards")
        if "completions" in row and len(row["completions"]) != len(row["rewards"]):  # picks would point elsewhere
            raise DataError(f"{cfg.input}:{i}: {len(row['completions'])} completions but {len(row['rewards'])} rewards")
        if len(row["rewards"]) < max(cfg.ns):
            raise DataError(f"{cfg.input}:{i}: {len(row['rewards'])} samples, fewer than the largest N in "
                            f"ns={list(cfg.ns)}; sample more (dpo-sample n=...) or lower ns")  # fmt: skip
    picks_out = cfg.get("completions")
    if picks_out and any("completions" not in r or "prompt" not in r for r in rows):
        raise ConfigError(f"completions={picks_out}: {cfg.input} rows need 'prompt' and 'completions' to pick from")
    temperature = samples_temperature(cfg.input) if picks_out else None
    seed = samples_seed(cfg.input)  # kept on each row: Best-of-N files of several seeds average into one point
    out, picked = [], []
    for n in track(cfg.ns, "best-of-n"):
        mean, picks = best_of_n([r["rewards"] for r in rows], n)
        picked += [{"policy": f"best_of_{n}", "temperature": temperature, "prompt": r["prompt"],
                    "completion": r["completions"][j]} for r, j in zip(rows, picks, strict=True)]  # fmt: skip
        out.append(
            {"method": "best_of_n", "n": n, "step": 0, "reward": mean, "kl": best_of_n_kl(n), "n_prompts": len(rows),
             "seed": seed}
        )
        log.info(f"best-of-{n}: reward {mean:.4f}, KL {best_of_n_kl(n):.3f}")
    if picks_out:
        log.info(f"picked completions ({len(picked)} rows) -> {write_jsonl(picks_out, picked)}")
    return write_jsonl(cfg.output, out)


def samples_temperature(scored: str) -> float:
    """The sampling temperature of a scored samples file, from the metadata dpo-sample and dpo-score wrote."""
    meta = Path(f"{scored}.meta.json")
    generation = ((json.loads(meta.read_text()) if meta.is_file() else {}).get("samples_meta") or {}).get(
        "generation"
    ) or {}
    if "temperature" not in generation:
        raise ConfigError(f"completions=: {meta} doesn't say the samples' temperature (dpo-score writes it)")
    return float(generation["temperature"])


def samples_seed(scored: str) -> int | None:
    """The seed dpo-sample drew a scored samples file with (from the metadata dpo-score kept); None
    when the metadata is not there."""
    meta = Path(f"{scored}.meta.json")
    seed = ((json.loads(meta.read_text()) if meta.is_file() else {}).get("samples_meta") or {}).get("seed")
    return seed if isinstance(seed, int) else None


@entry("best_of_n")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
