"""A run's identity across kills, requeues and reruns: its folder, its state file, and resuming.

A run is its folder (``outputs/<task_name>/runs/<run_name>``; a sweep job's is
``multiruns/<run_name>/<job number>``, which a requeued job keeps). ``run.json`` in it records the
run's id (also its wandb run id, so a resumed run continues the same wandb run), its status and
the held-out metrics before training. With ``ckpt_path=auto`` (the default) a run whose folder
holds a last checkpoint resumes from it, after checking that the config is the same except for
:data:`MAY_CHANGE`; a finished run is not trained again.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo.config.settings import ConfigError
from dpo.runtime.checkpoint import find_last
from dpo.runtime.io import write_json

STATE = "run.json"
MAY_CHANGE = (
    "run_name",  # the folder is the run's identity; with hydra.run.dir set, the default name is the time
    "ckpt_path",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "data.num_workers",
    "logger.wandb.name",  # the overrides' label: `trainer.max_steps=...` on resume changes it
    "log_export",
    "callbacks.reward_eval.log_samples",
    "guard.data_changed",  # the switch that accepts changed data on resume
)
"""Config keys a resumed run may change (how long to train and how to show it, not what)."""
STOP_KEYS = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time")


@dataclass
class RunState:
    """``run.json``: the run's id, status (``running`` or ``finished``), held-out metrics and cost."""

    id: str
    status: str = "running"
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the finished run's training jobs (resumed jobs add up)
    generated_tokens: int = 0  # tokens the run sampled to train (PPO rollouts; evaluation not counted)
    data: dict[str, str] = field(default_factory=dict)  # split -> fingerprint of its tokenized content
    data_history: list[dict[str, Any]] = field(default_factory=list)  # fingerprints replaced on resume, with the step

    @classmethod
    def load_or_new(cls, out_dir: Path) -> RunState:
        path = out_dir / STATE
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        return cls(id=secrets.token_hex(4))

    def save(self, out_dir: Path) -> None:
        write_json(out_dir / STATE, self.__dict__)


@dataclass(frozen=True)
class Resume:
    """What a run starts from: a checkpoint to resume (None: from scratch), and whether it already
    finished (then there is nothing to train)."""

    ckpt_path: str | None
    finished: bool = False


def check_run_name(run_name: Any) -> None:
    """A run's name is a folder under ``outputs/<task_name>/runs/``: non-empty, relative, no ``..``.

    Raises:
        ConfigError: naming the value.
    """
    name = str(run_name if run_name is not None else "")
    if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(
            f"run_name={name!r} must name a folder inside the task's runs folder: non-empty, relative, no '..' "
            "(e.g. run_name=beta0.1_seed0)"
        )


def check_same_data(state: RunState, now: dict[str, str], resumed_step: int | None, accept: bool) -> None:
    """Compare the data's fingerprints with those the run began with; record them in ``state``.

    Raises:
        ConfigError: a resumed run whose data changed, naming each split, unless ``accept``; then
            the old fingerprints go to ``state.data_history`` with the step they ended at.
    """
    changed = sorted(s for s in now if resumed_step is not None and state.data.get(s, now[s]) != now[s])
    if changed and not accept:
        what = ", ".join(f"{s} ({state.data[s]} -> {now[s]})" for s in changed)
        raise ConfigError(
            f"the data of this run changed since it began: {what}; resume it on the data it trained on, pick a new "
            "run_name, or go on with the new data and record it: guard.data_changed=accept"
        )
    if changed:
        state.data_history.append({"step": resumed_step, "data": dict(state.data)})
    state.data = dict(now)


def plan_resume(ckpt_path: str | None, out_dir: Path, resolved: dict[str, Any]) -> Resume:
    """Decide where a run starts. ``ckpt_path``: ``auto``, None (fresh) or a checkpoint path.

    ``auto`` resumes from ``<out_dir>/checkpoints/last.ckpt`` when there is one, refusing a config
    that changed in more than :data:`MAY_CHANGE` (naming the keys), and reports a finished run whose
    stopping keys are unchanged as finished.

    Raises:
        ConfigError: the config changed, or an explicit ``ckpt_path`` does not exist.
    """
    if ckpt_path is None:
        return Resume(None)
    if ckpt_path != "auto":
        if not Path(ckpt_path).exists():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint; use ckpt_path=auto or a path that exists")
        return Resume(ckpt_path)
    last = find_last(out_dir / "checkpoints")
    saved_config = out_dir / "config.yaml"
    if last is None or not saved_config.is_file():
        return Resume(None)
    before = OmegaConf.to_container(OmegaConf.load(saved_config))
    if changed := config_changes(before, resolved):
        raise ConfigError(
            f"{out_dir} holds a run with a different config ({', '.join(changed)}); resume it with the same "
            f"config (only {', '.join(MAY_CHANGE)} may change), or pick a new run_name"
        )
    state = out_dir / STATE
    finished = state.is_file() and json.loads(state.read_text()).get("status") == "finished"
    same_end = all(_select(before, k) == _select(resolved, k) for k in STOP_KEYS)
    return Resume(str(last), finished=finished and same_end)


def config_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, less :data:`MAY_CHANGE`."""
    flat_before, flat_now = _flatten(before), _flatten(now)
    keys = sorted(set(flat_before) | set(flat_now))
    return [
        f"{k}: {flat_before.get(k, '<absent>')!r} -> {flat_now.get(k, '<absent>')!r}"
        for k in keys
        if flat_before.get(k, "<absent>") != flat_now.get(k, "<absent>") and not k.startswith(MAY_CHANGE)
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}{key}.")
    return out


def _select(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
