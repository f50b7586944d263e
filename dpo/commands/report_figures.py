"""`dpo-report`: the run and sweep figures as PNG files, from the run folders alone (no wandb).

    dpo-report runs=[outputs/train/multiruns/<time>,<more run, sweep, Best-of-N or dpo-eval folders>] out=figures
    dpo-report runs=outputs/train/runs/<name> title="IMDB miniature"        # one folder needs no brackets

One PNG per figure family, each run a line (labelled by its overrides): ``rewards.png`` (reward
accuracy, margin, chosen and rejected rewards, train and validation), ``loss.png``, ``kl.png`` (KL to
the reference per token and per sequence, and of sampled completions), ``health.png`` (gradient
norm before clipping, tokens per second, peak memory), ``frontier.png`` (reward
against KL of every evaluation: the IMDB figure; runs that differ only in their seed are one point
with error bars over seeds) and ``win_rate.png`` (``dpo-eval`` results against
temperature), each drawn only if some folder holds its data. The dashboard (``dpo-dashboard``) shows
the same panels in wandb.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from dpo.commands.cli import entry
from dpo.config.schema import ReportConfig
from dpo.config.settings import ConfigError, check_ranges, require_keys
from dpo.report.figures import (
    CURVES,
    find_train_runs,
    find_win_rates,
    frontier_points,
    over_seeds,
    plot_curves,
    plot_frontier,
    plot_win_rates,
)
from dpo.runtime.io import DataError


def report(roots: list[Path], out: Path, title: str = "") -> list[Path]:
    """Draw every figure whose data is under ``roots`` into ``out``; returns the files written."""
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise ConfigError(f"runs: no such folder: {', '.join(missing)}")
    written = []
    runs = find_train_runs(roots)
    for family in CURVES:
        if runs and (path := plot_curves(runs, family, out / f"{family}.png")) is not None:
            written.append(path)
    if points := frontier_points(roots):  # runs that differ only in their seed: one point, bars over seeds
        written.append(plot_frontier(over_seeds(points), out / "frontier.png", title or "reward against KL"))
    if rows := find_win_rates(roots):
        written.append(plot_win_rates(rows, out / "win_rate.png", title or "win rate against temperature"))
    return written


def run_folders(runs: object) -> list[Path]:
    """``runs=`` as folders: one path, or a list of them; anything else is an error naming the key."""
    items = list(runs) if isinstance(runs, (list, ListConfig)) else [runs]
    if not items or not all(isinstance(r, str) and r.strip() for r in items):
        raise ConfigError(f"runs={runs!r} must be a folder or a list of folders, e.g. runs=[outputs/train/runs/a,...]")
    return [Path(r) for r in items]


@entry("report")
def main(cfg: DictConfig) -> list[Path]:
    require_keys(cfg, ["runs", "out", "title"])
    check_ranges(cfg, ReportConfig)
    roots = run_folders(cfg.runs)
    written = report(roots, Path(cfg.out), str(cfg.title or ""))
    if not written:
        shown = ", ".join(map(str, roots))
        raise DataError(f"no run logs (csv/metrics.csv), eval.jsonl or results.jsonl under {shown}")
    for path in written:
        print(path)  # noqa: T201 (the command's output: the files it wrote)
    return written


if __name__ == "__main__":
    main()
