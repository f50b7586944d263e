"""Which prompts an evaluation uses: a seeded choice of a data split's unique prompts (or a file's),
and the few-shot prefixes some policies sample after (``dpo-eval``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from dpo.config.settings import ConfigError, typed
from dpo.runtime.io import read_prompts
from dpo.runtime.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt: its place in the split's unique prompts, text, and the data's chosen response."""

    index: int
    text: str
    chosen: str | None


def choose_prompts(cfg: DictConfig, tokenizer: object) -> list[Prompt]:
    """A seeded choice of ``n_prompts`` unique prompts of the data's ``split`` (or ``prompts_file``),
    in their order there."""
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec

    if cfg.prompts_file:
        texts = load_prompt_file(cfg.prompts_file)
        keep = sorted(random.Random(cfg.seed).sample(range(len(texts)), min(cfg.n_prompts, len(texts))))
        log.info(f"{len(keep)} of {len(texts)} unique prompts of {cfg.prompts_file} chosen (seed {cfg.seed})")
        return [Prompt(i, texts[i], None) for i in keep]
    rows, _ = load_rows(typed(cfg.data.source, SourceSpec), cfg.split, on_bad_row=cfg.data.on_bad_row,
                             tokenizer=tokenizer)  # fmt: skip
    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(row.prompt, row.chosen)
    unique = list(first.items())
    keep = sorted(random.Random(cfg.seed).sample(range(len(unique)), min(cfg.n_prompts, len(unique))))
    log.info(f"{len(keep)} of {len(unique)} unique {cfg.split} prompts chosen (seed {cfg.seed})")
    return [Prompt(i, unique[i][0], unique[i][1]) for i in keep]


def load_prompt_file(path: str) -> list[str]:
    """The unique prompts of a text file (one per non-empty line) or a JSONL file (``prompt``)."""
    try:
        prompts = read_prompts(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"prompts_file: {e}") from None
    if not prompts:
        raise ConfigError(f"prompts_file={path}: no prompts")
    return list(dict.fromkeys(prompts))


def few_shot_prefixes(cfg: DictConfig) -> dict[str, str]:
    """Each ``few_shot`` policy's prompt prefix: ``k`` examples (prompt + chosen response, joined as
    they are: HH's prompts begin with ``\\n\\nHuman:``) drawn with the seed from the data's
    ``few_shot_split``, or a text file's content. The judge never sees the prefix."""
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec

    out = {}
    for name, shots in (cfg.few_shot or {}).items():
        if isinstance(shots, str):
            out[name] = Path(shots).read_text(encoding="utf-8")
            continue
        rows, _ = load_rows(typed(cfg.data.source, SourceSpec), cfg.few_shot_split, on_bad_row=cfg.data.on_bad_row)
        first = list(dict.fromkeys((r.prompt, r.chosen) for r in rows))
        if len(first) < shots:
            raise ConfigError(f"few_shot.{name}={shots}: split {cfg.few_shot_split!r} has {len(first)} examples")
        picked = random.Random(f"{cfg.seed}:few_shot:{name}").sample(first, shots)
        out[name] = "".join(prompt + chosen for prompt, chosen in picked)
        log.info(f"{name}: a {shots}-shot prefix of {len(out[name])} characters from split {cfg.few_shot_split!r}")
    return out
