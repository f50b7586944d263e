"""Checks of a composed config, and what is derived from it, before any data or weights load.

* :func:`check_schema`: every key of our groups is in its schema (:mod:`dpo.config.schema`), no ``???``
  is left, and a group's selector (``loss.name``, ``reference.kind``, ``reward.name``) matches the
  schema it was composed with.
* :func:`check_targets`: the keys of every ``_target_`` node (trainer, callbacks, loggers, the
  optimizer, the launcher) are parameters of its target.
* :func:`validate`: both, then every cross-field check in one place, returning the :class:`Plan`
  (batch split over devices and accumulation, and the batch layout).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from dpo.config.precision import PrecisionError, PrecisionPlan, check_update_precision, plan_precision
from dpo.config.schema import OUR_GROUPS, SELECTORS
from dpo.config.secrets import check_secrets
from dpo.config.settings import ConfigError, typed
from dpo.data.batch import Layout
from dpo.data.datamodule import DataConfig
from dpo.data.formats import get_format
from dpo.maths.losses import MIXTURE, Loss, get_loss
from dpo.models.forward import LayoutError, choose_layout
from dpo.models.load import ModelLoadError, max_positions
from dpo.runtime.io import DataError
from dpo.systems import SYSTEMS
from dpo.systems.base import OptimConfig
from dpo.systems.dpo import run_loss
from dpo.systems.reference import REFERENCES
from dpo.systems.spec import SystemSpec

USER_ERRORS = (ConfigError, DataError, ModelLoadError)
"""Mistakes a user can fix (config, data, model location): one clear line, no traceback (:mod:`dpo.commands.cli`)."""


@dataclass(frozen=True)
class Plan:
    """What a run derives from its config: how the global batch is spread, and the batch layout.

    ``batch_size = micro_batch_size * world_size * accumulate_grad_batches``.
    """

    world_size: int
    micro_batch_size: int
    accumulate_grad_batches: int
    layout: Layout = Layout.separate
    precision: PrecisionPlan | None = None  # what trainer.precision decides (dpo.config.precision)
    mesh: tuple[int, int] | None = None  # FSDP2's (data_parallel_size, tensor_parallel_size); None: not FSDP2


def plan_batch(batch_size: int, micro_batch_size: int, devices: Any, num_nodes: int) -> Plan:
    """Derive gradient accumulation from the global batch (pairs per optimizer step).

    Raises:
        ConfigError: when the numbers don't divide, naming them.
    """
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices must be a positive integer to plan the batch, got {devices!r}")
    world = devices * num_nodes
    per_step = micro_batch_size * world
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={batch_size} must be a positive multiple of data.micro_batch_size="
            f"{micro_batch_size} x world size {world} (trainer.devices={devices} x "
            f"trainer.num_nodes={num_nodes}) = {per_step}"
        )
    return Plan(world, micro_batch_size, batch_size // per_step)


def check_schema(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a ``???`` left, a key outside its schema, a mismatched
    selector, or a literal secret."""
    check_secrets(cfg)
    if missing := OmegaConf.missing_keys(cfg):
        raise ConfigError(f"required config value(s) not set: {sorted(missing)}")
    for group in OUR_GROUPS:
        if group not in cfg:
            continue
        schema = OmegaConf.get_type(cfg[group])
        if not dataclasses.is_dataclass(schema):
            raise ConfigError(
                f"config group {group!r} has no schema: its YAML file must begin its defaults list with "
                f"`- /schema/{group}@_here_`" + (": <choice>" if group in SELECTORS else "")
            )
        if group in SELECTORS:
            key = SELECTORS[group]
            composed = next(f.default for f in dataclasses.fields(schema) if f.name == key)
            if cfg[group][key] != composed:
                raise ConfigError(
                    f"{group}.{key}={cfg[group][key]} but the {group} config was composed for {composed!r}: "
                    f"choose it with {group}={cfg[group][key]}"
                )
    _check_typed_keys(cfg, "")


def _check_typed_keys(node: Any, where: str) -> None:
    """Keys of every structured node are its dataclass's fields (``+key=`` overrides can add others)."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        if unknown := sorted(set(node.keys()) - known):
            raise ConfigError(f"unknown key(s) {[where + str(k) for k in unknown]}; valid keys: {sorted(known)}")
    for key in node.keys():
        if not OmegaConf.is_missing(node, key) and isinstance(node._get_node(key), DictConfig):
            _check_typed_keys(node[key], f"{where}{key}.")


# Targets that pass **kwargs on: their keys are checked against where they go.
KWARGS_GO_TO = {
    "lightning.pytorch.loggers.WandbLogger": "wandb.init",
    "lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init",
}


def check_targets(node: Any, where: str, *, partial_args: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` naming a key that no ``_target_`` in ``node`` accepts.

    ``partial_args``: parameters given when a ``_partial_`` target is called (an optimizer's
    ``params``), which the config must not set.
    """
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target(node, where, partial_args)
        for key in node.keys():
            if isinstance(node._get_node(key), DictConfig):
                check_targets(node[key], f"{where}.{key}", partial_args=partial_args)


def _check_target(node: DictConfig, where: str, partial_args: tuple[str, ...]) -> None:
    path = node["_target_"]
    try:
        target = get_object(path)
    except Exception as e:  # hydra raises ImportError or its own errors for an unknown path
        raise ConfigError(f"{where}._target_={path!r} cannot be imported: {e}") from None
    params = _parameters(target)
    if path in KWARGS_GO_TO:
        params = (params - {None}) | _parameters(get_object(KWARGS_GO_TO[path]))
    if None in params:  # takes **kwargs we can't follow: nothing to check against
        return
    keys = {k for k in node.keys() if not str(k).startswith("_")}
    if unknown := sorted(keys - params - set(partial_args)):
        raise ConfigError(f"unknown key(s) {[f'{where}.{k}' for k in unknown]} for {path}; valid: {sorted(params)}")


def _parameters(target: Any) -> set[str | None]:
    """Named parameters of a class's ``__init__`` or a function; ``None`` in the set if it takes **kwargs."""
    sig = inspect.signature(target)
    out: set[str | None] = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            out.add(None)
        elif p.kind is not p.VAR_POSITIONAL:
            out.add(p.name)
    return out


def is_sharded(trainer: DictConfig) -> bool:
    """Whether the trainer's strategy shards parameters (FSDP), from the strategy's class."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry

    strategy = OmegaConf.select(trainer, "strategy", default="auto")
    if isinstance(strategy, DictConfig):
        cls = get_object(strategy["_target_"])
    else:
        # StrategyRegistry.get would build the strategy; its entry names the class.
        cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    return isinstance(cls, type) and issubclass(cls, FSDPStrategy | ModelParallelStrategy)


def all_at_once(*checks: Callable[[], Any]) -> list[Any]:
    """Run every check and return what each returns; if any failed, raise one :class:`ConfigError`
    holding each failure's message (a ``ValueError``'s too: the checks name their keys)."""
    problems, results = [], []
    for check in checks:
        try:
            results.append(check())
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return results


def validate(cfg: DictConfig, model_config: Any = None, model_class: type | None = None) -> Plan:
    """Check the composed config against its schema, its targets, itself and the model; return the plan.

    Three rounds, each reporting every mistake it finds in one message: the schema (missing and
    unknown keys); each group's targets and range checks; the cross-field checks, which read
    values the second round has proven in range: the loss has the reference it needs, the system's
    own checks, total length within the model's positions, the data format gives what the loss
    needs, the precision, the batch divides over devices and accumulation, the layout suits model
    and strategy. Loads nothing: ``model_config`` and ``model_class`` are the model's transformers
    config and class (:func:`dpo.models.load.load_config`, no weights); without them the model
    checks are skipped and the layout is left ``auto``.
    """
    check_schema(cfg)
    if HydraConfig.initialized():  # the launcher's own schema (e.g. SlurmQueueConf), after `+` overrides
        _check_typed_keys(HydraConfig.get().launcher, "hydra.launcher.")
    system, kind = SYSTEMS[cfg.system.kind], cfg.reference.kind
    try:
        if cfg.loss.name != MIXTURE:
            get_loss(cfg.loss.name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    all_at_once(  # each group's targets and own range checks (its schema's __post_init__)
        *(lambda group=group: check_targets(cfg.get(group), group) for group in ("trainer", "callbacks", "logger")),
        lambda: check_targets(cfg.optim.optimizer, "optim.optimizer", partial_args=("params",)),
        lambda: typed(cfg.system, system.config),  # KL coefficients, clip ranges, GAE, generation
        lambda: typed(cfg.optim, OptimConfig),  # learning rate > 0, warmup >= 0
        lambda: run_loss(cfg),  # beta > 0, ...
        lambda: typed(cfg.reference, REFERENCES[kind].Config),  # TR-DPO's sync settings
        lambda: typed(cfg.data, DataConfig),  # batch sizes >= 1, 0 < max_prompt_length < max_length
    )
    pairs = needs_pairs(cfg)
    *_, precision, plan, layout = all_at_once(  # the cross-field checks
        lambda: _check_reference(cfg, system, run_loss(cfg)),
        lambda: _check_system(cfg, system),
        lambda: _check_positions(cfg.data, model_config),
        lambda: _check_source(cfg, pairs),
        lambda: _checked_precision(cfg),
        lambda: _batch_plan(cfg, system),
        lambda: _layout(cfg, system, model_class, model_config, pairs),
    )
    return dataclasses.replace(plan, layout=layout, precision=precision,
                               mesh=device_mesh(cfg.trainer, plan.world_size))  # fmt: skip


def _check_positions(data: DictConfig, model_config: Any) -> None:
    positions = max_positions(model_config) if model_config is not None else None
    if positions is not None and data.max_length > positions:
        raise ConfigError(
            f"data.max_length={data.max_length} exceeds the model's {positions} positions; lower data.max_length"
        )


def _checked_precision(cfg: DictConfig) -> PrecisionPlan:
    precision = precision_plan(cfg)
    check_update_precision(cfg, precision)
    return precision


def _layout(cfg: DictConfig, system: SystemSpec, model_class: type | None, model_config: Any, pairs: bool) -> Layout:
    """The batch layout: ``data.layout``, or for ``auto`` what the model and strategy allow (needs the model)."""
    layout = Layout(cfg.data.layout)
    if model_class is None:
        return layout
    try:
        return choose_layout(layout, model_class, model_config, sharded=is_sharded(cfg.trainer),
                             pairs=pairs and system.uses_loss)  # fmt: skip
    except LayoutError as e:
        raise ConfigError(str(e)) from None


def _batch_plan(cfg: DictConfig, system: SystemSpec) -> Plan:
    """The global batch over devices and accumulation, and the steps it makes, as the system allows."""
    data = cfg.data
    if "accumulate_grad_batches" in cfg.trainer:
        raise ConfigError("trainer.accumulate_grad_batches is derived from data.batch_size; don't set it")
    plan = plan_batch(data.batch_size, data.micro_batch_size, cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))
    if system.manual_steps and plan.accumulate_grad_batches != 1:
        raise ConfigError(
            f"system={cfg.system.kind} steps its optimizer itself, one batch at a time: data.batch_size="
            f"{data.batch_size} must equal data.micro_batch_size={data.micro_batch_size} x world size {plan.world_size}"
        )
    steps = system.steps_per_batch(cfg)
    if steps > 1 and (cfg.trainer.get("max_steps") or -1) > 0 and cfg.trainer.max_steps % steps:
        raise ConfigError(
            f"system={cfg.system.kind} makes {steps} optimizer steps per batch; trainer.max_steps="
            f"{cfg.trainer.max_steps} would stop inside one: use a multiple of {steps}"
        )
    return plan


def _check_reference(cfg: DictConfig, system: SystemSpec, loss: Loss) -> None:
    """The reference kind suits the system (and, for a system trained with a loss, the loss)."""
    kind = cfg.reference.kind
    if system.uses_loss and loss.needs_reference and kind == "none":
        raise ConfigError(f"loss {cfg.loss.name!r} needs a reference model but reference=none")
    if system.uses_loss and loss.needs_tails and kind == "precomputed":
        raise ConfigError("loss.ld_alpha splits each response at its pair's shared length; reference=precomputed "
                          "caches whole-response sums: use reference=copy (or lora)")
    if system.references is not None and system.references and kind not in system.references:
        raise ConfigError(
            f"system={cfg.system.kind} needs a reference that scores the sequences it samples "
            f"(reference={' or '.join(system.references)}); reference={kind} can't"
            + (": its log-probs are precomputed for the data's pairs only" if kind == "precomputed" else "")
        )


def device_mesh(trainer: DictConfig, world: int) -> tuple[int, int] | None:
    """FSDP2's ``(data_parallel_size, tensor_parallel_size)`` under ``ModelParallelStrategy``; None otherwise.

    ``auto`` means every process (pure FSDP, what conf/trainer/fsdp.yaml asks for). Lightning 2.6.6's
    own ``auto`` is the number of nodes, which with ``tensor_parallel_size: 1`` fails at the first
    validation on any node with more than one GPU ("multiplied should equal the world size").

    Raises:
        ConfigError: sizes whose product is not the world size.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = OmegaConf.select(trainer, "strategy")
    if not isinstance(strategy, DictConfig) or not issubclass(get_object(strategy["_target_"]), ModelParallelStrategy):
        return None
    tp, dp = strategy.get("tensor_parallel_size", "auto"), strategy.get("data_parallel_size", "auto")
    tp = 1 if tp == "auto" else tp
    if tp != 1:  # configure_model shards over the data-parallel mesh only; a TP plan would be silently unused
        raise ConfigError(f"trainer.strategy.tensor_parallel_size={tp}: tensor parallelism is not implemented; use 1")
    dp = world if dp == "auto" else dp
    if not isinstance(dp, int) or dp * tp != world:
        raise ConfigError(
            f"trainer.strategy.data_parallel_size={dp} x tensor_parallel_size={tp} must equal the world size {world} "
            "(trainer.devices x trainer.num_nodes); data_parallel_size=auto shards over every process"
        )
    return dp, tp


def precision_plan(cfg: DictConfig) -> PrecisionPlan:
    """What ``trainer.precision`` decides for this run (:func:`dpo.config.precision.plan_precision`).

    Also refuses ``trainer.accelerator=gpu`` where no CUDA device is visible (Lightning would
    refuse it only when the trainer is built, after the weights load).
    """
    import torch

    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    planning = bool(OmegaConf.select(cfg, "preflight.enabled", default=False))  # for GPUs it need not see
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not planning:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible here; "
            "run on a GPU node, or use trainer.accelerator=cpu (trainer=cpu, ddp_cpu or fsdp_cpu)"
        )
    try:
        return plan_precision(
            trainer.get("precision", "32-true"), accelerator=accelerator, sharded=is_sharded(trainer),
            clip=trainer.get("gradient_clip_val"), optimizer=OmegaConf.to_container(cfg.optim.optimizer, resolve=True),
        )  # fmt: skip
    except PrecisionError as e:
        raise ConfigError(str(e)) from None


def needs_pairs(cfg: DictConfig) -> bool:
    """Whether the run's batches hold chosen and rejected responses (the system or its loss says)."""
    data = SYSTEMS[cfg.system.kind].data
    return run_loss(cfg).needs_pairs if data is None else data == "pairs"


def _check_system(cfg: DictConfig, system: SystemSpec) -> None:
    """What any system needs of the rest of the config, then the system's own checks (its spec's ``check``)."""
    kind = cfg.system.kind
    if not system.samples:
        for name, node in (cfg.get("callbacks") or {}).items():
            target = str((node or {}).get("_target_", ""))
            if target.rsplit(".", 1)[-1] in SAMPLING_CALLBACKS:
                raise ConfigError(
                    f"callbacks.{name} ({target}) samples from a language model; system={kind} trains a "
                    f"classifier: drop it (callbacks.{name}=null)"
                )
    if not system.shardable and is_sharded(cfg.trainer):
        raise ConfigError(f"system={kind} runs under DDP (trainer=ddp), not a sharded (FSDP) strategy yet")
    system.check(cfg)


SAMPLING_CALLBACKS = ("RewardKLEval", "GenerationSamples")
"""Callbacks that sample from the trained model (a reward model can't be sampled)."""


def _check_source(cfg: DictConfig, needs_pairs: bool) -> None:
    source = cfg.data.source
    try:
        fmt = get_format(source.format)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if missing := sorted({"train", "val"} - set(source.splits or {})):
        raise ConfigError(f"data.source.splits needs {missing} entries")
    options = OmegaConf.to_container(source.options, resolve=True) if source.options is not None else {}
    params = inspect.signature(fmt.parse).parameters
    allowed = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "tokenizer")
    if unknown := sorted(set(options) - set(allowed)):
        raise ConfigError(f"data.source.options {unknown} unknown for format {source.format!r}; valid: {allowed}")
    if fmt.labelled and SYSTEMS[cfg.system.kind].data != "unpaired":  # SFT would learn the undesirable ones too
        raise ConfigError(f"data format {source.format!r} holds labelled completions, not pairs: use system=kto")
    if needs_pairs and not fmt.has_pairs(options):
        who = f"loss {cfg.loss.name!r}" if SYSTEMS[cfg.system.kind].uses_loss else f"system={cfg.system.kind}"
        raise ConfigError(
            f"{who} needs preference pairs but data format {source.format!r} gives none "
            "(its rows have no rejected response); use loss=sft or a pairs data set"
        )
