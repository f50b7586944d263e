"""Config nodes as typed objects, and the error a bad setting raises (below every module that
configures something, so a system's or a command's file can check its own settings).

* :class:`ConfigError`: a composed config that cannot run; its message names the key.
* :func:`typed`: a node as an instance of its schema dataclass (types, then the schema's own range
  checks in ``__post_init__``).
* :func:`check_ranges`: a schema's range checks on a config Hydra has already typed.
* :func:`require_keys`: keys that must be set.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key."""


def typed(node: Any, schema: type[T]) -> T:
    """``node`` (a config node, or a plain mapping) as an instance of its ``schema`` dataclass.

    Raises:
        ConfigError: a key or value the schema does not allow, naming it.
    """
    if isinstance(node, DictConfig):  # interpolations resolve against the whole config first
        node = OmegaConf.to_container(node, resolve=True)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(f"{schema.__name__}: {e.msg} (key {e.full_key!r})") from None
    except ValueError as e:  # a schema's own range checks (__post_init__), which name their keys
        raise ConfigError(str(e)) from None


def check_ranges(cfg: DictConfig, schema: type) -> None:
    """Run ``schema``'s own range checks (its ``__post_init__``) on ``cfg``'s values, every mistake at once.

    Hydra has type-checked ``cfg`` against ``schema`` when it composed it; this resolves only the keys
    the checks read (not ``task_name``/``run_name``, nor ``Any`` nodes such as other config groups).

    Raises:
        ConfigError: the schema's message, naming each key.
    """
    hints = typing.get_type_hints(schema)
    if unknown := sorted(set(cfg.keys()) - set(hints)):  # `+key=...` adds keys Hydra does not type
        raise ConfigError(f"unknown key(s) {unknown}; valid keys: {sorted(hints)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if kind is Any or f.name in ("task_name", "run_name") or f.name not in cfg:
            continue
        value = cfg[f.name]
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            values[f.name] = kind(**value) if dataclasses.is_dataclass(kind) else value
        except TypeError as e:  # an added key in a typed node
            raise ConfigError(f"{f.name}: {e}") from None
    try:
        schema(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def require_keys(cfg: DictConfig, keys: list[str]) -> None:
    """Raise :class:`ConfigError` naming the first of ``keys`` that is absent, ``???`` or null."""
    if missing := OmegaConf.missing_keys(cfg):
        raise ConfigError(f"required config value(s) not set: {sorted(missing)}")
    for key in keys:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise ConfigError(f"config key {key!r} must be set")
