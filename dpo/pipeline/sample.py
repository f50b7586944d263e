"""`dpo-sample`: k completions per prompt from a causal LM, with the settings recorded.

    dpo-sample model.pretrained=<dir or hub id> prompts.file=prompts.jsonl n=4
    dpo-sample model.pretrained=<sft>/hf data=imdb prompts.split=train   # IMDB prefixes as prompts

Writes ``<output>`` (JSONL: ``{"prompt", "completions": [k strings]}``) and ``<output>.meta.json``
(model identity, generation settings, seed, prompt source).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dpo.cli import entry
from dpo.config import ConfigError, require_keys, typed
from dpo.io import read_jsonl, write_json, write_jsonl
from dpo.log import get_logger
from dpo.models import ModelConfig, load_policy, load_tokenizer, resolve
from dpo.sampling import GenerationConfig, generate

log = get_logger(__name__)


def load_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompts.file`` (JSONL with ``prompts.field``, or text, one per line) or from
    the unique prompts of ``data``'s ``prompts.split``; at most ``prompts.max_prompts``."""
    p = cfg.prompts
    if p.file:
        path = Path(p.file)
        if path.suffix == ".jsonl":
            prompts = [row[p.field] for row in read_jsonl(path, {p.field: str})]
        else:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif cfg.get("data") is not None:
        from dpo.data.formats import load_rows
        from dpo.data.sources import SourceSpec

        rows, _ = load_rows(typed(cfg.data.source, SourceSpec), p.split, on_bad_row=cfg.data.on_bad_row)
        prompts = list(dict.fromkeys(r.prompt for r in rows))
    else:
        raise ConfigError("set prompts.file, or a data config (data=imdb) to take prompts from")
    for i, text in enumerate(prompts, 1):
        if not text.strip():
            raise ValueError(f"{p.file or 'data'}: prompt {i} is empty")
    return prompts[: p.max_prompts] if p.max_prompts else prompts


def sample(cfg: DictConfig) -> Path:
    """Run the sampling step; returns the samples file."""
    require_keys(cfg, ["model.pretrained", "n", "batch_size", "output", "generation.max_new_tokens"])
    if cfg.n < 1:
        raise ConfigError(f"n must be >= 1, got {cfg.n}")
    gen = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
    gen.kwargs()  # checks the settings before any weights load
    prompts = load_prompts(cfg)
    m = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    tokenizer = load_tokenizer(m.tokenizer.pretrained or m.pretrained, revision=m.revision,
                               trust_remote_code=m.trust_remote_code)  # fmt: skip
    ids = [tokenizer(t)["input_ids"][-cfg.prompts.max_tokens :] for t in prompts]
    model = load_policy(m)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    started = time.time()
    repeated = [p for p in ids for _ in range(cfg.n)]  # k consecutive samples per prompt
    completions = generate(model, repeated, gen, tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.batch_size,
                           progress=f"sample {len(repeated)} completions")  # fmt: skip
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rows = [{"prompt": prompt, "completions": texts[i * cfg.n : (i + 1) * cfg.n]} for i, prompt in enumerate(prompts)]
    out = write_jsonl(cfg.output, rows)
    write_json(f"{out}.meta.json", {
        "model": {"pretrained": cfg.model.pretrained, "revision": m.revision, "dtype": m.dtype.value},
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "n": cfg.n, "seed": cfg.seed, "prompts": cfg.prompts.file or f"data:{cfg.data.source.path}:{cfg.prompts.split}",
        "n_prompts": len(prompts), "seconds": round(time.time() - started, 1),
    })  # fmt: skip
    log.info(f"sampled {len(texts)} completions of {len(prompts)} prompts in {time.time() - started:.0f}s -> {out}")
    return out


@entry("sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
