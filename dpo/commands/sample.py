"""`dpo-sample`: k completions per prompt from a causal LM, with the settings recorded.

    dpo-sample model.pretrained=<dir or hub id> prompts.file=prompts.jsonl n=4
    dpo-sample model.pretrained=<sft>/hf data=imdb prompts.split=train   # IMDB prefixes as prompts

Writes ``<output>`` (JSONL: ``{"prompt", "completions": [k strings]}``) and ``<output>.meta.json``
(model identity, generation settings, seed, prompt source).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpo.commands.cli import entry
from dpo.config.schema import SampleConfig
from dpo.config.settings import ConfigError, check_ranges, require_keys, typed
from dpo.models.completions import sample_texts
from dpo.models.load import ModelConfig, load_policy, load_tokenizer, resolve
from dpo.models.sampling import GenerationConfig
from dpo.runtime.io import DataError, read_prompts, write_json, write_jsonl
from dpo.runtime.log import get_logger

log = get_logger(__name__)


def load_prompts(cfg: DictConfig, tokenizer: Any = None) -> list[str]:
    """Prompts from ``prompts.file`` (JSONL with ``prompts.field``, or text, one per line) or from
    the unique prompts of ``data``'s ``prompts.split`` (``tokenizer``: the model's, for formats that
    cut with it, e.g. IMDB's token prefixes); at most ``prompts.max_prompts``."""
    p = cfg.prompts
    if p.file:
        prompts = read_prompts(p.file, p.field)
    elif cfg.get("data") is not None:
        from dpo.data.formats import load_rows
        from dpo.data.sources import SourceSpec

        rows, _ = load_rows(typed(cfg.data.source, SourceSpec), p.split, on_bad_row=cfg.data.on_bad_row,
                            tokenizer=tokenizer)  # fmt: skip
        prompts = list(dict.fromkeys(r.prompt for r in rows))
    else:
        raise ConfigError("set prompts.file, or a data config (data=imdb) to take prompts from")
    if not prompts:
        raise DataError(f"{p.file or 'data'}: no prompts")
    for i, text in enumerate(prompts, 1):
        if not text.strip():
            raise DataError(f"{p.file or 'data'}: prompt {i} is empty")
    return prompts[: p.max_prompts] if p.max_prompts is not None else prompts


def sample(cfg: DictConfig) -> Path:
    """Run the sampling step; returns the samples file."""
    require_keys(cfg, ["model.pretrained", "n", "batch_size", "output", "generation.max_new_tokens"])
    check_ranges(cfg, SampleConfig)  # every range at once (n, batch_size, max_prompts, generation), before any load
    gen = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
    prompts = load_prompts(cfg) if cfg.prompts.file else None  # a file's mistakes before anything loads
    m = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    tokenizer = load_tokenizer(m.tokenizer.pretrained or m.pretrained, revision=m.revision,
                               trust_remote_code=m.trust_remote_code)  # fmt: skip
    if prompts is None:  # from a data config, which may cut prompts with the tokenizer (IMDB's token prefixes)
        prompts = load_prompts(cfg, tokenizer)
    model = load_policy(m)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    started = time.time()
    sampled = sample_texts(model, tokenizer, prompts, gen, n=cfg.n, batch_size=cfg.batch_size,
                           progress=f"sample {len(prompts) * cfg.n} completions")  # fmt: skip
    if sampled.skipped:
        log.warning(f"{sampled.skipped} of {len(prompts)} prompts do not fit the model's context with "
                    f"{gen.max_new_tokens} new tokens: skipped (prompts are never cut)")  # fmt: skip
    rows = [{"prompt": p, "completions": t} for p, t in zip(prompts, sampled.texts, strict=True) if t is not None]
    if not rows:
        raise ConfigError(f"no prompt fits the model's context with generation.max_new_tokens={gen.max_new_tokens}")
    out = write_jsonl(cfg.output, rows)
    write_json(f"{out}.meta.json", {
        "model": {"pretrained": cfg.model.pretrained, "revision": m.revision, "dtype": m.dtype.value},
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "n": cfg.n, "seed": cfg.seed, "prompts": cfg.prompts.file or f"data:{cfg.data.source.path}:{cfg.prompts.split}",
        "n_prompts": len(rows), "skipped_prompts": sampled.skipped, "seconds": round(time.time() - started, 1),
    })  # fmt: skip
    log.info(f"sampled {len(rows) * cfg.n} completions of {len(rows)} prompts in {time.time() - started:.0f}s -> {out}")
    return out


@entry("sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
