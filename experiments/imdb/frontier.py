"""The reward-vs-KL frontier (the DPO paper's Fig. 2, left) from the runs of a sweep.

    python experiments/imdb/frontier.py outputs/imdb_mini/multiruns/<time> outputs/best_of_n/runs/<time> \
        --out experiments/imdb/frontier.png [--wandb]

Every folder given is searched for ``eval.jsonl`` files: a training run's (written by
``dpo.evaluation.reward_kl.RewardKLEval``, one row per evaluation, the method read from the run's
``config.yaml``) or a Best-of-N file (rows with ``"method": "best_of_n"``). One point per
evaluation, one colour per method; a table of the points is printed and written beside the PNG.
The figure code is the package's (:mod:`dpo.report.figures`); ``dpo-report`` draws the same figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpo.report.figures import frontier_points, plot_frontier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="sweep, run or Best-of-N folders")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"))
    parser.add_argument("--title", default="IMDB sentiment: reward vs KL")
    parser.add_argument("--wandb", action="store_true", help="also log the plot and table to wandb")
    parser.add_argument("--wandb-project", default="dpo-imdb")
    args = parser.parse_args()
    points = frontier_points(args.roots)
    if not points:
        raise SystemExit(f"no eval.jsonl under {[str(r) for r in args.roots]}")
    plot_frontier(points, args.out, args.title)
    table = args.out.with_suffix(".jsonl")
    table.write_text("".join(json.dumps(p) + "\n" for p in points))
    print(f"{'method':<22} {'step/N':>6} {'KL':>8} {'reward':>8}")
    for p in sorted(points, key=lambda p: (p["label"], p["step"])):
        print(f"{p['label']:<22} {p['step']:>6} {p['kl']:>8.3f} {p['reward']:>8.4f}")
    print(f"wrote {args.out} and {table}")
    if args.wandb:
        import wandb

        run = wandb.init(project=args.wandb_project, job_type="frontier")
        run.log({"frontier": wandb.Image(str(args.out)),
                 "points": wandb.Table(columns=list(points[0]), data=[list(p.values()) for p in points])})  # fmt: skip
        run.finish()


if __name__ == "__main__":
    main()
