"""`dpo-train`: check the config, start or resume the run, fit, export, summarise.

dpo-train                                   # the offline default run: DPO on SmolLM2-135M
dpo-train experiment=tiny                   # the fast test configuration
dpo-train loss=ipo_sum loss.beta=0.5        # another loss
dpo-train -m loss.beta=0.05,0.1,1,5         # a sweep (one run folder per job)
dpo-train run_name=my_run                   # a named run: the same command again resumes it
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from dpo.commands.cli import entry
from dpo.config.preflight import Estimate, PreflightConfig, estimate, model_shape, stand_ins
from dpo.config.secrets import redact
from dpo.config.settings import ConfigError, typed
from dpo.config.validate import USER_ERRORS, Plan, needs_pairs, validate
from dpo.data.datamodule import DataConfig, PreferenceDataModule
from dpo.data.formats import get_format, load_rows
from dpo.data.sources import SourceSpec
from dpo.models.export import export_pretrained, write_model_card
from dpo.models.load import (
    ModelConfig,
    causal_lm_class,
    load_config,
    load_tokenizer,
    parameter_shapes,
    resolve,
)
from dpo.report.csv_logger import ResumableCSVLogger
from dpo.report.naming import flatten
from dpo.report.summary import RunSummary, reports
from dpo.report.wandb_logging import log_export
from dpo.runtime.checkpoint import check_fits
from dpo.runtime.log import get_logger
from dpo.runtime.run import Resume, RunState, check_run_name, check_same_data, plan_resume
from dpo.systems import SYSTEMS
from dpo.systems.base import System
from dpo.systems.reference import LoraConfig

log = get_logger(__name__)
WANDB_LOGGERS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger")


@dataclass
class Start:
    """What a run knows before it loads anything: the checked config and the plan derived from it,
    the model config, and where it starts (:mod:`dpo.runtime.run`)."""

    plan: Plan
    model: ModelConfig
    config: dict[str, Any]  # resolved, secrets redacted: what config.yaml and the loggers get
    resume: Resume
    state: RunState


@dataclass
class Run:
    """A training job's parts, built in order by :func:`build`."""

    start: Start
    tokenizer: Any
    datamodule: PreferenceDataModule
    module: System
    trainer: pl.Trainer


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Run one training job described by a composed config; return the final validation metrics."""
    started = time.time()
    start = begin(cfg)
    out = Path(cfg.paths.output_dir)
    if start.resume.finished:
        log.info(f"{out} holds a finished run (run.json); nothing to train. Use a new run_name to train again.")
        return start.state.after
    run = build(cfg, start, extra_callbacks)
    trainer, module, datamodule, state = run.trainer, run.module, run.datamodule, start.state
    with closing_wandb():
        for logger in trainer.loggers:  # flat: dotted keys sort and filter in wandb's run table
            logger.log_hyperparams(flatten(start.config))
        if (reference := module.reference) is not None:
            reference.prepare(trainer, module, datamodule)
        if not (start.resume.ckpt_path and state.before):  # a resumed run measured its start already
            state.before = held_out_metrics(trainer, module, datamodule)
            record(trainer, state, out)
        trainer.fit(module, datamodule=datamodule, ckpt_path=start.resume.ckpt_path)
        best = best_checkpoint(trainer)  # model_checkpoint.monitor: its best weights are measured and exported
        state.after = held_out_metrics(trainer, module, datamodule, ckpt_path=best)
        export_dir = export_pretrained(module.policy, run.tokenizer, out / "hf", write=trainer.is_global_zero)
        if cfg.log_export and export_dir is not None:
            log_export(trainer, export_dir, f"{cfg.task_name}-{state.id}-hf")
        state.status = "finished"
        state.seconds = round(state.seconds + time.time() - started, 1)
        state.generated_tokens = int(module.generated_tokens)
        record(trainer, state, out)
    summary = summarize(cfg, run, export_dir, time.time() - started).render()
    if export_dir is not None:
        write_model_card(export_dir, start.config, SYSTEMS[cfg.system.kind].describe(cfg), summary, command_line())
    log.info(summary)
    return state.after


def command_line() -> str:
    """The command that ran this job: ``dpo-train`` and its overrides (Hydra's), or how it was called."""
    if HydraConfig.initialized():  # as typed: an interpolation such as ${oc.env:TOKEN} stays unresolved
        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        return " ".join(["dpo-train", *(shlex.quote(str(o)) for o in overrides)])
    return "dpo.commands.train.train(cfg) from Python (no command line)"


def begin(cfg: DictConfig) -> Start:
    """Check the config alone, then against the model's config (no weights); decide where the run
    starts (:func:`dpo.runtime.run.plan_resume`); write the run folder's config. Loads no data or weights."""
    check_run_name(cfg.run_name)
    validate(cfg)
    model = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    model_config = load_config(model)
    plan = validate(cfg, model_config, causal_lm_class(model_config))
    out = Path(cfg.paths.output_dir)
    config = redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    resume = plan_resume(cfg.ckpt_path, out, config)
    state = RunState.load_or_new(out)
    if not resume.finished:
        state.status = "running"  # until it finishes again: a killed extension must not read as finished
    if rank_zero_only.rank == 0 and not resume.finished:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(config), out / "config.yaml")
        state.save(out)
    if resume.ckpt_path:
        log.info(f"resuming from {resume.ckpt_path}")
    if plan.precision.note:
        log.info(plan.precision.note)
    _sanitize_wandb_env()
    pl.seed_everything(cfg.seed, workers=True)
    return Start(plan, model, config, resume, state)


def build(cfg: DictConfig, start: Start, extra_callbacks: list[pl.Callback] | None = None) -> Run:
    """Read the data, load the weights and assemble the job (nothing is trained).

    The tokenizer comes first, then a checkpoint to resume is checked against the model (no
    weights), then the data is read, checked and tokenized, and only then do weights load, so a
    mistake fails before any expensive work. ``extra_callbacks`` join the configured ones.
    """
    kind = cfg.system.kind
    tokenizer = build_tokenizer(cfg, start.model)
    resumed_step = check_resume(start, tokenizer, kind)
    data = typed(cfg.data, DataConfig)
    datamodule = PreferenceDataModule(tokenizer, data, pairs=needs_pairs(cfg), layout=start.plan.layout, seed=cfg.seed,
                                      prompts=SYSTEMS[kind].data == "prompts",
                                      unpaired=SYSTEMS[kind].data == "unpaired")  # fmt: skip
    datamodule.setup("fit")
    fingerprints = {split: datamodule.content_fingerprint(split) for split in sorted(datamodule.datasets)}
    check_same_data(start.state, fingerprints, resumed_step, accept=cfg.guard.data_changed == "accept")
    check_extension(cfg, len(datamodule.datasets["train"]), resumed_step)
    if rank_zero_only.rank == 0:
        start.state.save(Path(cfg.paths.output_dir))
    with_tokenizer = {"dpo.evaluation.reward_kl.RewardKLEval": {"tokenizer": tokenizer}}  # prompts from a data source
    callbacks = instantiate_all(cfg.callbacks, with_tokenizer) + list(extra_callbacks or [])
    check_monitor(callbacks)
    module = SYSTEMS[kind].build(cfg, start, tokenizer)
    clip = None if SYSTEMS[kind].manual_steps else cfg.trainer.get("gradient_clip_val")  # PPO clips in its own steps
    loggers = instantiate_loggers(cfg.logger, start.state.id, resumed_step)
    mesh = start.plan.mesh  # FSDP2's sizes, "auto" resolved (dpo.config.validate.device_mesh)
    sizes = {} if mesh is None else {"strategy": OmegaConf.merge(
        cfg.trainer.strategy, {"data_parallel_size": mesh[0], "tensor_parallel_size": mesh[1]})}  # fmt: skip
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, plugins=cluster_plugins(),
                          accumulate_grad_batches=start.plan.accumulate_grad_batches,
                          gradient_clip_val=clip, **sizes)  # fmt: skip
    return Run(start, tokenizer, datamodule, module, trainer)


def check_resume(start: Start, tokenizer: Any, kind: str) -> int | None:
    """The global step of the checkpoint the run resumes from, after checking it holds this system's
    model (the full set of names and shapes) and nothing of another's."""
    if not start.resume.ckpt_path:
        return None
    system = SYSTEMS[kind]
    expected = parameter_shapes(load_config(start.model, tokenizer), classifier=system.classifier)
    try:
        return check_fits(start.resume.ckpt_path, expected, system.checkpoint_extras)
    except ValueError as e:
        raise ConfigError(f"ckpt_path: {e}") from None


def check_extension(cfg: DictConfig, train_rows: int, resumed_step: int | None) -> None:
    """Refuse a resumed run that ``trainer.max_steps`` extends but ``trainer.max_epochs`` has already ended.

    Optimizer steps per epoch: whole global batches of the training split (the sampler drops the
    last partial one) times the system's steps per batch (:attr:`dpo.systems.SystemSpec.steps_per_batch`).
    """
    max_steps, max_epochs = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_epochs")
    if resumed_step is None or max_steps is None or max_steps <= resumed_step or max_epochs in (None, -1):
        return
    per_epoch = train_rows // cfg.data.batch_size * SYSTEMS[cfg.system.kind].steps_per_batch(cfg)
    if max_epochs * per_epoch <= resumed_step:
        raise ConfigError(
            f"trainer.max_steps={max_steps} extends this run past step {resumed_step}, but trainer.max_epochs="
            f"{max_epochs} ({per_epoch} steps each) already ended it: raise trainer.max_epochs too "
            "(or trainer.max_epochs=-1 to stop at max_steps alone)"
        )


def instantiate_all(group: DictConfig, extra: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """The objects of a group of ``_target_`` nodes (``extra``: more keyword arguments per target;
    a node set to null is left out); a user error raised inside one surfaces as itself."""
    extra, out = extra or {}, []
    for name, node in group.items():
        if node is None:
            continue
        try:
            out.append(instantiate(node, **extra.get(str(node.get("_target_")), {})))
        except InstantiationException as e:
            if isinstance(e.__cause__, USER_ERRORS):
                raise e.__cause__ from None
            if isinstance(e.__cause__, ValueError | MisconfigurationException):  # a constructor's own range check
                raise ConfigError(f"{group._key()}.{name}: {e.__cause__}") from None
            raise
    return out


def instantiate_loggers(group: DictConfig, run_id: str, resumed_step: int | None) -> list[Any]:
    """The loggers, continuing the run's own wandb run (its id is the run's) and CSV file on resume."""
    loggers = instantiate_all(group, {target: {"id": run_id, "resume": "allow"} for target in WANDB_LOGGERS})
    for logger in loggers:
        if resumed_step is not None and isinstance(logger, ResumableCSVLogger):
            logger.resume_at(resumed_step)
    return loggers


def cluster_plugins() -> list[Any]:
    """On SLURM, submitit owns requeueing (:mod:`dpo.runtime.checkpoint`): Lightning's auto-requeue is off."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def record(trainer: pl.Trainer, state: RunState, out: Path) -> None:
    """Save ``run.json`` (global rank 0)."""
    if trainer.is_global_zero:
        state.save(out)


def build_tokenizer(cfg: DictConfig, model: ModelConfig) -> Any:
    """The configured tokenizer; with no pretrained one, a BPE trained on the training split."""
    source = model.tokenizer.pretrained or model.pretrained
    corpus = None
    if source is None:
        spec = typed(cfg.data.source, SourceSpec)
        fmt = get_format(spec.format)
        if fmt.needs_tokenizer(spec.options):
            if fmt.corpus_options is None:
                raise ConfigError(
                    f"data format {spec.format!r} renders with a pretrained tokenizer's chat template; "
                    "set model.tokenizer.pretrained"
                )
            spec = replace(spec, options={**spec.options, **fmt.corpus_options})  # the same texts, cut without it
        rows, _ = load_rows(spec, "train", on_bad_row=cfg.data.on_bad_row)
        corpus = [t for r in rows for t in (r.prompt, r.chosen, r.rejected) if t]
    return load_tokenizer(source, revision=model.revision, trust_remote_code=model.trust_remote_code,
                          corpus=corpus, bpe_vocab_size=model.tokenizer.bpe_vocab_size)  # fmt: skip


def held_out_metrics(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, ckpt_path: str | None = None
                     ) -> dict[str, float]:  # fmt: skip
    """The validation metrics of ``module`` now (``ckpt_path``: after loading that checkpoint's weights)."""
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best checkpoint by the checkpoint callback's ``monitor`` (None without one), announced."""
    cb = trainer.checkpoint_callback
    if cb is None or cb.monitor is None or not cb.best_model_path:
        return None
    log.info(f"the best checkpoint by {cb.monitor} ({cb.mode}: {float(cb.best_model_score):.4g}) is measured and "
             f"exported: {cb.best_model_path}")  # fmt: skip
    return cb.best_model_path


def check_monitor(callbacks: list[pl.Callback]) -> None:
    """A monitored checkpoint callback must keep at least one checkpoint besides last.ckpt."""
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.save_top_k == 0:
            raise ConfigError(f"callbacks.model_checkpoint.monitor={cb.monitor} keeps nothing with save_top_k=0; "
                              "set callbacks.model_checkpoint.save_top_k=1 to keep (and export) the best")  # fmt: skip


def summarize(cfg: DictConfig, run: Run, export_dir: Path | None, seconds: float) -> RunSummary:
    """The run's :class:`RunSummary`."""
    trainer, datamodule, state = run.trainer, run.datamodule, run.start.state
    source = cfg.data.source
    target = source.splits["val"]
    described = target if source.path is None else f"{source.path} [{target}] ({source.format})"
    return RunSummary(
        title=SYSTEMS[cfg.system.kind].describe(cfg), steps=trainer.global_step, seconds=seconds,
        held_out=(len(datamodule.datasets["val"]), described), before=state.before, after=state.after,
        sections=reports([*trainer.callbacks, run.module]), data_stats=datamodule.stats,
        checkpoint=checkpoint_line(trainer.checkpoint_callback),
        export=export_dir, out_dir=Path(cfg.paths.output_dir),
        logs="config.yaml, run.json, csv/metrics.csv" + (", wandb/" if "wandb" in cfg.logger else ""),
    )  # fmt: skip


def checkpoint_line(cb: ModelCheckpoint | None) -> str | None:
    """The summary's checkpoint line: last.ckpt, and the best one where a metric is monitored."""
    if cb is None:
        return None
    if cb.monitor is None or not cb.best_model_path:
        return cb.last_model_path
    return f"{cb.last_model_path} (best by {cb.monitor}, exported: {cb.best_model_path})"


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


def preflight(cfg: DictConfig) -> Estimate:
    """Validate ``cfg``, estimate one step's memory and time per rank, log the table; raise
    :class:`ConfigError` with the table when the total exceeds the device."""
    pf = typed(cfg.preflight, PreflightConfig)
    filled = stand_ins(cfg, pf)
    validate(cfg)
    model = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    model_config = load_config(model)
    plan = validate(cfg, model_config, causal_lm_class(model_config))
    system = SYSTEMS[cfg.system.kind]
    lora = typed(cfg.reference, LoraConfig) if cfg.reference.kind == "lora" else None
    shape = model_shape(model_config, classifier=system.classifier, lora=lora)
    per_example = system.sequences_per_example(cfg) if system.sequences_per_example else 1 + needs_pairs(cfg)
    result = estimate(cfg, plan, shape, pf, per_example)
    where = f"{plan.world_size} rank(s), {'FSDP2-sharded' if plan.mesh else 'replicated'}"
    title = (f"preflight: {type(model_config).__name__} {shape.parameters / 1e9:.2f}B parameters "
             f"({shape.trainable / 1e9:.3g}B trained), {where}, {plan.precision.precision}, "
             f"micro-batch {plan.micro_batch_size} x accumulation {plan.accumulate_grad_batches}; "
             f"step time at {pf.mfu:.0%} of {pf.peak_tflops:g} TFLOPS")  # fmt: skip
    if filled:
        title += f"\n  (stand-ins, never read: {', '.join(filled)})"
    table = result.table(title)
    if not result.fits:
        raise ConfigError(f"{table}\nthis config does not fit {pf.device_gb:g} GB per device: shard it (trainer=fsdp), "
                          "lower data.micro_batch_size, set model.gradient_checkpointing=true, or use "
                          "reference=precomputed")  # fmt: skip
    log.info(table)
    return result


@entry("train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers (nothing after a preflight)."""
    if cfg.preflight.enabled:
        preflight(cfg)
        return None
    return train(cfg).get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
