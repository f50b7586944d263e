"""Secrets in configs: a secret-looking key must take its value from the environment
(``'${oc.env:VAR}'``); a literal value is refused before anything runs, scrubbed from Hydra's files
(:func:`dpo.commands.cli.scrub_hydra_files`) and redacted wherever a resolved config is written or logged.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

from dpo.config.settings import ConfigError

_SECRET = re.compile(r"api_?key|secret|password|credential|^(hf_|auth_|access_)?token$", re.IGNORECASE)
_FROM_ENV = re.compile(r"^\$\{oc\.env:[^}]+\}$")


def is_secret(key: Any) -> bool:
    """Whether a config key names a secret (api keys, tokens, passwords)."""
    return bool(_SECRET.search(str(key)))


def check_secrets(node: Any, where: str = "") -> None:
    """Secrets come from the environment: a secret-looking key must hold ``${oc.env:VAR}`` (or null).

    A literal value would be written by Hydra (``.hydra/``), recorded by wandb (the command line)
    and pickled by a launcher; an environment interpolation is all any of them ever sees.
    """
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            check_secrets(child, f"{where}{key}.")
        elif is_secret(key) and child._value() is not None and not _FROM_ENV.match(str(child._value())):
            raise ConfigError(
                f"{where}{key} holds a literal secret; give it from the environment instead: "
                f"{where}{key}='${{oc.env:YOUR_VARIABLE}}'"
            )


def literal_secrets(overrides: list[str]) -> list[str]:
    """The values of command-line overrides (``key=value``) that set a secret-looking key literally."""
    found = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep and value and is_secret(key.split(".")[-1].lstrip("+~")) and not value.startswith("${"):
            found.append(value.strip("'\""))
    return found


def redact(container: Any) -> Any:
    """A copy of a plain config container with values of secret-looking keys replaced."""
    if isinstance(container, dict):
        return {k: "<redacted>" if is_secret(k) and v is not None else redact(v) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container
