"""`dpo-report`: the run and sweep figures as PNG files, from the run folders alone (no wandb).

    dpo-report outputs/train/multiruns/<time> [more run, sweep, Best-of-N or dpo-eval folders] --out figures

One PNG per figure family, each run a line (labelled by its overrides): ``rewards.png`` (reward
accuracy, margin, chosen and rejected rewards, train and validation), ``loss.png``, ``kl.png`` (KL to
the reference per token and per sequence, and of sampled completions), ``health.png`` (gradient
norm before clipping, tokens per second, peak memory), ``frontier.png`` (reward
against KL of every evaluation: the IMDB figure) and ``win_rate.png`` (``dpo-eval`` results against
temperature), each drawn only if some folder holds its data. The dashboard (``dpo-dashboard``) shows
the same panels in wandb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpo.data.sources import DataError
from dpo.report.figures import (
    CURVES,
    find_train_runs,
    find_win_rates,
    frontier_points,
    plot_curves,
    plot_frontier,
    plot_win_rates,
)


def report(roots: list[Path], out: Path, title: str = "") -> list[Path]:
    """Draw every figure whose data is under ``roots`` into ``out``; returns the files written."""
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"dpo-report: no such folder: {', '.join(missing)}")
    written = []
    runs = find_train_runs(roots)
    for family in CURVES:
        if runs and (path := plot_curves(runs, family, out / f"{family}.png")) is not None:
            written.append(path)
    if points := frontier_points(roots):
        written.append(plot_frontier(points, out / "frontier.png", title or "reward against KL"))
    if rows := find_win_rates(roots):
        written.append(plot_win_rates(rows, out / "win_rate.png", title or "win rate against temperature"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpo-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("roots", nargs="+", type=Path, help="run, sweep, Best-of-N or dpo-eval folders")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNG files")
    parser.add_argument("--title", default="", help="title of the frontier and win-rate figures")
    args = parser.parse_args(argv)
    try:
        written = report(args.roots, args.out, args.title)
    except (FileNotFoundError, DataError) as e:  # each names its file (and line)
        sys.exit(f"dpo-report: {e}" if isinstance(e, DataError) else str(e))
    if not written:
        sys.exit(f"dpo-report: no run logs (csv/metrics.csv), eval.jsonl or results.jsonl under {args.roots}")
    for path in written:
        print(path)  # noqa: T201 (the command's output: the files it wrote)


if __name__ == "__main__":
    main()
