"""`dpo-train`: compose the config, check it, fit, export, summarise.

dpo-train                                   # the offline default run: DPO on SmolLM2-135M
dpo-train experiment=tiny                   # the fast test configuration
dpo-train loss=ipo_sum loss.beta=0.5        # another loss
dpo-train -m loss.beta=0.05,0.1,1,5         # a sweep (one run folder per job)
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo.cli import entry
from dpo.config import USER_ERRORS, ConfigError, Plan, loss_params, redact, typed, validate
from dpo.data.datamodule import DataConfig, PreferenceDataModule
from dpo.data.formats import get_format, load_rows
from dpo.data.sources import SourceSpec
from dpo.forward import attention_for
from dpo.log import get_logger
from dpo.losses import get_loss
from dpo.models import (
    ModelConfig,
    causal_lm_class,
    export_pretrained,
    load_config,
    load_policy,
    load_tokenizer,
    model_identity,
    resolve,
)
from dpo.reference import REFERENCES, build_reference
from dpo.report.summary import RunSummary, reports
from dpo.systems.base import OptimConfig
from dpo.systems.dpo import DPOModule

log = get_logger(__name__)


@dataclass
class Run:
    """A training job's parts, built in order by :func:`build`.

    Attributes:
        plan: what was derived from the config (batch split, layout).
        config: the resolved config as logged (secrets redacted).
    """

    plan: Plan
    config: dict[str, Any]
    tokenizer: Any
    datamodule: PreferenceDataModule
    module: DPOModule
    trainer: pl.Trainer


def build(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> Run:
    """Check the config, read the data, load the weights and assemble the job (nothing is trained).

    The order is the contract: the config is checked alone, then against the model's config (no
    weights), then the data is read, checked and tokenized, and only then do weights load, so a
    mistake fails before any expensive work. ``extra_callbacks`` join the configured ones.
    """
    validate(cfg)
    model_cfg = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    model_config = load_config(model_cfg)
    plan = validate(cfg, model_config, causal_lm_class(model_config))
    resolved = start_run(cfg)
    spec = get_loss(cfg.loss.name)
    tokenizer = build_tokenizer(cfg, model_cfg)
    data = typed(cfg.data, DataConfig)
    datamodule = PreferenceDataModule(tokenizer, data, pairs=spec.needs_pairs, layout=plan.layout, seed=cfg.seed)
    datamodule.setup("fit")
    callbacks = instantiate_all(cfg.callbacks) + list(extra_callbacks or [])

    policy = load_policy(model_cfg, tokenizer=tokenizer, attn_implementation=attention_for(plan.layout))
    policy, reference = build_reference(
        typed(cfg.reference, REFERENCES[cfg.reference.kind].Config), policy, needs_reference=spec.needs_reference,
        cache_dir=data.cache_dir,
        identity={"model": model_identity(model_cfg, cfg.seed), "precision": str(cfg.trainer.precision)},
    )  # fmt: skip
    reference.prepare(policy, datamodule)
    module = DPOModule(
        policy, reference, cfg.loss.name, loss_params(cfg), typed(cfg.optim, OptimConfig),
        nll_weight=cfg.loss.nll_weight, fsdp_block=model_cfg.fsdp_block,
    )  # fmt: skip
    loggers = instantiate_all(cfg.logger)
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks,
                          accumulate_grad_batches=plan.accumulate_grad_batches)  # fmt: skip
    return Run(plan, resolved, tokenizer, datamodule, module, trainer)


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Run one training job described by a composed config; return the final validation metrics."""
    started = time.time()
    run = build(cfg, extra_callbacks)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    with closing_wandb():
        for logger in trainer.loggers:
            logger.log_hyperparams(run.config)
        before = held_out_metrics(trainer, module, datamodule)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        after = held_out_metrics(trainer, module, datamodule)
        out = Path(cfg.paths.output_dir) / "hf"
        export_dir = export_pretrained(module.policy, run.tokenizer, out, write=trainer.is_global_zero)
    log.info(summarize(cfg, trainer, datamodule, before, after, export_dir, time.time() - started).render())
    return after


def instantiate_all(group: DictConfig) -> list[Any]:
    """The objects of a group of ``_target_`` nodes; a user error raised inside one surfaces as itself."""
    try:
        return [instantiate(node) for node in group.values()]
    except InstantiationException as e:
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise


def start_run(cfg: DictConfig) -> dict[str, Any]:
    """Create the run folder, write the resolved config (secrets redacted), seed; return that config."""
    _sanitize_wandb_env()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.save(OmegaConf.create(resolved), out_dir / "config.yaml")
    pl.seed_everything(cfg.seed, workers=True)
    return resolved


def build_tokenizer(cfg: DictConfig, model: ModelConfig) -> Any:
    """The configured tokenizer; with no pretrained one, a BPE trained on the training split."""
    source = model.tokenizer.pretrained or model.pretrained
    corpus = None
    if source is None:
        spec = typed(cfg.data.source, SourceSpec)
        if get_format(spec.format).needs_tokenizer:
            raise ConfigError(
                f"data format {spec.format!r} renders with a pretrained tokenizer's chat template; "
                "set model.tokenizer.pretrained"
            )
        rows, _ = load_rows(spec, "train", on_bad_row=cfg.data.on_bad_row)
        corpus = [t for r in rows for t in (r.prompt, r.chosen, r.rejected) if t]
    return load_tokenizer(source, revision=model.revision, trust_remote_code=model.trust_remote_code,
                          corpus=corpus, bpe_vocab_size=model.tokenizer.bpe_vocab_size)  # fmt: skip


def held_out_metrics(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """The validation metrics of ``module`` now."""
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def summarize(cfg, trainer, datamodule, before, after, export_dir, seconds) -> RunSummary:  # noqa: ANN001
    """The run's :class:`RunSummary`."""
    source = cfg.data.source
    target = source.splits["val"]
    described = target if source.path is None else f"{source.path} [{target}] ({source.format})"
    params = ", ".join(f"{k}={v}" for k, v in loss_params(cfg).items())
    return RunSummary(
        title=f"loss={cfg.loss.name}({params})", steps=trainer.global_step, seconds=seconds,
        held_out=(len(datamodule.datasets["val"]), described), before=before, after=after,
        sections=reports(trainer.callbacks), data_stats=datamodule.stats,
        checkpoint=trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None,
        export=export_dir, out_dir=Path(cfg.paths.output_dir),
        logs="config.yaml, csv/metrics.csv" + (", wandb/" if "wandb" in cfg.logger else ""),
    )  # fmt: skip


def _sanitize_wandb_env() -> None:
    # wandb rejects an empty WANDB_MODE with a validation error; treat it as unset.
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]
        log.warning("WANDB_MODE was set but empty; ignoring it (logger.wandb.offline decides)")


@contextmanager
def closing_wandb():
    """Close a wandb run this job opened, failed or not, so the next job of a multirun starts clean."""
    failed = True
    try:
        yield
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if failed else 0)


@entry("train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    return train(cfg).get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
