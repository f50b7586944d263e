"""`dpo-score`: a ground-truth reward for every sampled completion.

    dpo-score input=samples.jsonl reward=vader
    dpo-score input=samples.jsonl reward=hf_classifier   # paper: siebert/sentiment-roberta-large-english

Adds ``"rewards"`` (one float per completion) to each row of the samples file and writes
``<output>`` plus ``<output>.meta.json`` (the reward config and the samples' metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpo.commands.cli import entry
from dpo.config.schema import ScoreConfig
from dpo.config.settings import ConfigError, check_ranges, require_keys
from dpo.rewards.registry import default_device, reward_from_config
from dpo.runtime.io import DataError, read_jsonl, write_json, write_jsonl
from dpo.runtime.log import get_logger
from dpo.runtime.progress import track

log = get_logger(__name__)


def score(cfg: DictConfig) -> Path:
    """Run the scoring step; returns the scored file."""
    require_keys(cfg, ["input", "output", "reward.name"])
    check_ranges(cfg, ScoreConfig)  # batch_size >= 1
    rows = read_jsonl(cfg.input, {"prompt": str, "completions": list})
    for i, row in enumerate(rows, 1):
        if not row["completions"] or not all(isinstance(c, str) for c in row["completions"]):
            raise DataError(f"{cfg.input}:{i}: 'completions' must be a non-empty list of strings")
    try:
        reward = reward_from_config(OmegaConf.to_container(cfg.reward, resolve=True))
    except ValueError as e:  # an unknown reward name or a bad reward setting
        raise ConfigError(f"reward: {e}") from None
    if hasattr(reward, "to"):  # a model: on this process's device
        reward.to(default_device())
    texts = [(r["prompt"] + c) if cfg.include_prompt else c for r in rows for c in r["completions"]]
    values = []
    for start in track(range(0, len(texts), cfg.batch_size), f"score {len(texts)} completions"):
        values += reward(texts[start : start + cfg.batch_size])
    k = 0
    for row in rows:
        row["rewards"] = values[k : k + len(row["completions"])]
        k += len(row["completions"])
    out = write_jsonl(cfg.output, rows)
    meta_in = Path(f"{cfg.input}.meta.json")
    write_json(f"{out}.meta.json", {
        "reward": OmegaConf.to_container(cfg.reward, resolve=True), "include_prompt": cfg.include_prompt,
        "samples": str(cfg.input), "samples_meta": json.loads(meta_in.read_text()) if meta_in.is_file() else None,
    })  # fmt: skip
    mean = sum(values) / len(values)
    log.info(f"scored {len(values)} completions with {cfg.reward.name}: mean reward {mean:.4f} -> {out}")
    return out


@entry("score")
def main(cfg: DictConfig) -> None:
    score(cfg)


if __name__ == "__main__":
    main()
