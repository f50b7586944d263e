"""What goes to wandb besides Lightning's scalar charts: tables, the per-run frontier chart, the export.

wandb plots every metric against one x axis (Lightning's WandbLogger: ``trainer/global_step``), so
reward against KL cannot be a metric chart: the evaluations are logged as a table
(``eval/frontier``: step, kl, kl_mc, reward, tokens) with a scatter chart built on it
(``eval/frontier_chart``); each evaluation re-logs the whole table, so the latest holds every point.
Everything here is a no-op without a WandbLogger and on ranks other than 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

FRONTIER_TABLE = "eval/frontier"
FRONTIER_CHART = "eval/frontier_chart"
SAMPLES_TABLE = "eval/samples"
WIN_RATES_TABLE = "eval/win_rates"  # dpo-eval's results (dpo.commands.evaluate)
FRONTIER_COLUMNS = ["step", "kl", "kl_mc", "reward", "tokens"]
SAMPLE_COLUMNS = ["step", "prompt", "completion", "reward", "kl"]


def wandb_runs(trainer: Any) -> list[Any]:
    """The wandb runs of the trainer's WandbLoggers (empty off rank 0 or without one)."""
    from lightning.pytorch.loggers import WandbLogger

    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_frontier(trainer: Any, evaluations: Sequence[dict[str, Any]]) -> None:
    """The run's evaluations so far as a table and a reward-against-KL scatter chart."""
    runs = wandb_runs(trainer)
    if not runs:
        return
    import wandb

    table = wandb.Table(columns=FRONTIER_COLUMNS, data=[[e[c] for c in FRONTIER_COLUMNS] for e in evaluations])
    chart = wandb.plot.scatter(table, "kl", "reward", title="reward against KL(policy || reference)")
    for run in runs:
        run.log({FRONTIER_TABLE: table, FRONTIER_CHART: chart})


def log_samples(trainer: Any, step: int, rows: Sequence[dict[str, Any]]) -> None:
    """One evaluation's samples (prompt, completion, reward, per-sample KL) as a table."""
    runs = wandb_runs(trainer)
    if not runs:
        return
    import wandb

    table = wandb.Table(columns=SAMPLE_COLUMNS, data=[[step, r["prompt"], r["completion"], r["reward"], r["kl"]]
                                                      for r in rows])  # fmt: skip
    for run in runs:
        run.log({SAMPLES_TABLE: table})


def log_export(trainer: Any, export_dir: Path, name: str) -> None:
    """The ``hf`` export as a wandb model artifact (kept locally offline; ``wandb sync`` uploads it)."""
    runs = wandb_runs(trainer)
    if not runs:
        return
    import wandb

    for run in runs:
        artifact = wandb.Artifact(name=name, type="model", description="the trained policy (save_pretrained)")
        artifact.add_dir(str(export_dir))
        run.log_artifact(artifact)
