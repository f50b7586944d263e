"""How a run is named and grouped where people look at many runs at once (wandb).

A sweep's jobs share their task and differ by their overrides, so a job is named by them:
``dpo-train -m loss.beta=0.1,1 optim.optimizer.lr=1e-6`` gives runs ``train beta=0.1 lr=1e-6`` and
``train beta=1 lr=1e-6``. Keys are shortened to their last part unless two overrides share it;
paths, Hydra's own keys and anything secret-looking are left out. Jobs of one ``-m`` invocation
share a group (their sweep folder) unless ``run_group`` names one.
"""

from __future__ import annotations

from pathlib import Path

from dpo.config.secrets import is_secret, literal_secrets

LEFT_OUT = ("hydra.", "paths.", "run_name", "ckpt_path", "run_group", "tags", "logger.")
"""Override keys that say where or how a run is recorded, not what it is."""


def run_label(task_name: str, overrides: list[str]) -> str:
    """``task_name`` followed by the run's ``key=value`` overrides, keys shortened where unambiguous."""
    secrets = set(literal_secrets(overrides))
    pairs = []
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and not key.startswith(LEFT_OUT) and not is_secret(key) and value not in secrets:
            pairs.append((key, value))
    lasts = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    parts = [f"{last if lasts.count(last) == 1 else k}={v}" for (k, v), last in zip(pairs, lasts, strict=True)]
    return " ".join([task_name, *parts])


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def resolve_run_label(task_name: str) -> str:
    """``${run_label:${task_name}}``: this Hydra job's label (just the task outside a Hydra job)."""
    hc = _hydra()
    return run_label(task_name, list(hc.overrides.task)) if hc is not None else task_name


def resolve_run_group(run_group: str | None, task_name: str) -> str | None:
    """``${run_group_or_sweep:${run_group},${task_name}}``: ``run_group`` if set; in a ``-m`` sweep
    ``<task>/<sweep folder>``, the same for all its jobs; else None."""
    if run_group:
        return run_group
    hc = _hydra()
    from hydra.types import RunMode

    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return f"{task_name}/{Path(hc.sweep.dir).name}"
    return None


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (what wandb's run table and parallel-coordinates
    panels sort and filter by); lists stay values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out
