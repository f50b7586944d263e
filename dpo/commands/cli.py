"""What every entry point shares: the config folder, the schemas, and how user mistakes end.

    @entry("train")          # conf/train.yaml
    def main(cfg: DictConfig) -> float | None: ...

A mistake the user can fix (a :class:`~dpo.config.settings.ConfigError`, :class:`~dpo.data.sources.DataError`
or :class:`~dpo.models.load.ModelLoadError`), and a run the non-finite guard stopped
(:class:`~dpo.systems.base.NonFiniteError`), and a judge that cannot work as configured
(:class:`~dpo.judges.base.JudgeError`: no API key, max_requests), is logged as one line
naming what, where and how to fix, and the program exits with status 1; set ``DPO_FULL_ERROR=1``
for the traceback (as Hydra's ``HYDRA_FULL_ERROR``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import dpo.config.schema  # noqa: F401  (registers the config schemas before Hydra composes)
from dpo.config.secrets import literal_secrets
from dpo.config.validate import USER_ERRORS
from dpo.judges.base import JudgeError
from dpo.runtime.io import atomic_write
from dpo.runtime.log import get_logger
from dpo.systems.base import NonFiniteError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The Hydra config folder (``conf/`` at the repository root)."""

log = get_logger("dpo")


def scrub_hydra_files() -> None:
    """Replace secrets given literally on the command line in the files Hydra wrote before the task
    started (``.hydra/*.yaml``, a sweep's ``multirun.yaml``): :func:`dpo.config.secrets.check_secrets` then
    refuses the run, and nothing in its folder holds the secret."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    secrets = literal_secrets(list(hc.overrides.task))
    if not secrets:
        return
    files = [Path(hc.sweep.dir) / "multirun.yaml"]
    if hc.output_subdir is not None:
        files += [
            Path(hc.runtime.output_dir) / hc.output_subdir / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")
        ]
    for path in files:
        if path.is_file():
            text = path.read_text()
            for secret in secrets:
                text = text.replace(secret, "<redacted>")
            atomic_write(path, lambda tmp, t=text: tmp.write_text(t))


def entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """A Hydra entry point on ``conf/<config_name>.yaml`` whose user errors end in one line."""

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            scrub_hydra_files()
            try:
                return task(cfg)
            except (*USER_ERRORS, NonFiniteError, JudgeError) as e:
                if os.environ.get("DPO_FULL_ERROR") == "1":
                    raise
                log.error(f"{type(e).__name__}: {e}  (DPO_FULL_ERROR=1 shows the traceback)")
                sys.exit(1)

        return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(run)

    return wrap
