"""Config schema checks and derived numbers, run on the composed config before any weights load."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo.data.formats import get_format
from dpo.data.packing import LAYOUTS
from dpo.data.sources import DataError, bundled_path
from dpo.losses import check_loss_params, get_loss


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key."""


# The keys each section of ours must have; a typo in an experiment file fails here, by name.
SECTION_KEYS: dict[str, set[str]] = {
    "data": {
        "source",
        "on_bad_row",
        "group_by_prompt",
        "layout",
        "cache_dir",
        "batch_size",
        "micro_batch_size",
        "eval_batch_size",
        "max_length",
        "max_prompt_length",
        "truncation_side",
        "shuffle",
        "num_workers",
    },  # fmt: skip
    "data.source": {"format", "path", "name", "data_dir", "revision", "splits", "max_rows", "options"},
    "model": {
        "pretrained",
        "revision",
        "dtype",
        "trust_remote_code",
        "architecture",
        "tokenizer",
        "gradient_checkpointing",
        "fused_activations",
        "fsdp_block",
    },  # fmt: skip
    "model.tokenizer": {"pretrained", "bpe_vocab_size"},
    "optim": {"optimizer", "warmup_steps", "decay"},
}
REFERENCE_KEYS = {
    "copy": {"kind", "sync_every", "sync_alpha"},
    "lora": {"kind", "r", "alpha", "dropout", "target_modules"},
    "precomputed": {"kind", "batch_size"},
    "none": {"kind"},
}
_SECRET = re.compile(r"api_?key|secret|password|credential|^(hf_|auth_|access_)?token$", re.IGNORECASE)


def register_resolvers() -> None:
    """``${bundled:NAME}`` resolves to a data file shipped in ``dpo/data/files``."""
    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", bundled_path)


register_resolvers()


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is spread: ``batch_size = micro_batch_size * world_size * accumulate``."""

    world_size: int
    micro_batch_size: int
    accumulate_grad_batches: int


def plan_batch(batch_size: int, micro_batch_size: int, devices: Any, num_nodes: int) -> BatchPlan:
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
    return BatchPlan(world, micro_batch_size, batch_size // per_step)


def _check_keys(cfg: DictConfig, section: str) -> None:
    node = OmegaConf.select(cfg, section)
    if node is None:
        raise ConfigError(f"missing config section {section!r}")
    have, want = set(node.keys()), SECTION_KEYS[section]
    if unknown := sorted(have - want):
        raise ConfigError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; valid keys: {sorted(want)}")
    if missing := sorted(want - have):
        raise ConfigError(f"missing key(s) {[f'{section}.{k}' for k in missing]}")


def require_keys(cfg: DictConfig, keys: list[str]) -> None:
    """Raise :class:`ConfigError` naming the first of ``keys`` that is absent, ``???`` or null."""
    if missing := OmegaConf.missing_keys(cfg):
        raise ConfigError(f"required config value(s) not set: {sorted(missing)}")
    for key in keys:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise ConfigError(f"config key {key!r} must be set")


def loss_params(cfg: DictConfig) -> dict[str, Any]:
    """The loss's hyperparameters: every key of ``cfg.loss`` except ``name`` and ``nll_weight``."""
    return {k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k not in ("name", "nll_weight")}


def validate(cfg: DictConfig) -> BatchPlan:
    """Check the composed config; return the batch plan. Loads nothing.

    Checks: no ``???`` left; known keys in our sections; loss name and parameters; a reference
    when the loss needs one; prompt length below total length; batch divisibility.
    """
    if missing := OmegaConf.missing_keys(cfg):
        raise ConfigError(f"required config value(s) not set: {sorted(missing)}")
    for section in SECTION_KEYS:
        _check_keys(cfg, section)
    for key in ("name", "nll_weight"):
        if key not in cfg.loss:
            raise ConfigError(f"missing key 'loss.{key}'")
    try:
        spec = get_loss(cfg.loss.name)
        check_loss_params(cfg.loss.name, loss_params(cfg))
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e.args[0])) from None
    kind = OmegaConf.select(cfg, "reference.kind")
    if kind not in REFERENCE_KEYS:
        raise ConfigError(f"reference.kind={kind!r}; choose from {sorted(REFERENCE_KEYS)}")
    if unknown := sorted(set(cfg.reference) - REFERENCE_KEYS[kind]):
        raise ConfigError(f"unknown key(s) {[f'reference.{k}' for k in unknown]} for reference.kind={kind}")
    if missing := sorted(REFERENCE_KEYS[kind] - set(cfg.reference)):
        raise ConfigError(f"missing key(s) {[f'reference.{k}' for k in missing]}")
    if spec.needs_reference and kind == "none":
        raise ConfigError(f"loss {cfg.loss.name!r} needs a reference model but reference=none")
    if kind == "copy" and cfg.reference.sync_every and not 0 < cfg.reference.sync_alpha <= 1:
        raise ConfigError(f"reference.sync_alpha must be in (0, 1], got {cfg.reference.sync_alpha}")
    data = cfg.data
    if not 0 < data.max_prompt_length < data.max_length:
        raise ConfigError(
            f"need 0 < data.max_prompt_length ({data.max_prompt_length}) < data.max_length ({data.max_length})"
        )
    _check_source(cfg, spec.needs_pairs)
    if data.layout not in ("auto", *LAYOUTS):
        raise ConfigError(f"data.layout must be auto or one of {LAYOUTS}, got {data.layout!r}")
    if data.layout in ("shared_prefix", "padding_free") and _is_fsdp(cfg):
        raise ConfigError(
            f"data.layout={data.layout} is untested under FSDP2; use data.layout=auto or separate with trainer=fsdp"
        )
    if "accumulate_grad_batches" in cfg.trainer:
        raise ConfigError("trainer.accumulate_grad_batches is derived from data.batch_size; don't set it")
    return plan_batch(data.batch_size, data.micro_batch_size, cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))


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
    if needs_pairs and not fmt.has_pairs(options):
        raise ConfigError(
            f"loss {cfg.loss.name!r} needs preference pairs but data format {source.format!r} gives none "
            "(its rows have no rejected response); use loss=sft or a pairs data set"
        )
    if cfg.data.on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row must be error or skip, got {cfg.data.on_bad_row!r}")


def _is_fsdp(cfg: DictConfig) -> bool:
    return "ModelParallel" in str(OmegaConf.select(cfg, "trainer.strategy._target_"))


def resolve_layout(cfg: DictConfig) -> str:
    """``data.layout=auto``: ``padding_free`` (exact, fastest), except under FSDP2 (``separate``).

    A model whose attention doesn't go through transformers' attention interface can't run
    padding-free; ``dpo.train`` then falls back to ``shared_prefix`` (auto only).
    """
    if cfg.data.layout != "auto":
        return cfg.data.layout
    return "separate" if _is_fsdp(cfg) else "padding_free"


def redact(container: Any) -> Any:
    """A copy of a plain config container with values of secret-looking keys replaced."""
    if isinstance(container, dict):
        return {
            k: "<redacted>" if _SECRET.search(str(k)) and v is not None else redact(v) for k, v in container.items()
        }
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container
