"""The reward-vs-KL frontier (the DPO paper's Fig. 2, left) from the runs of a sweep.

    python experiments/imdb/frontier.py outputs/imdb_mini/multiruns/<time> outputs/best_of_n/runs/<time> \
        --out experiments/imdb/frontier.png [--rm <reward model run>] [--wandb]

Every folder given is searched for ``eval.jsonl`` files: a training run's (written by
``dpo.evaluation.reward_kl.RewardKLEval``, one row per evaluation, the method read from the run's
``config.yaml``) or a Best-of-N file (rows with ``"method": "best_of_n"``). One point per
evaluation, one colour per method, error bars the standard error over the evaluation's samples;
runs that differ only in their seed (``-m seed=0,1``) are one point, their mean, with capped error
bars over seeds (reward and KL); a
table of the points is printed and written beside the PNG (``.jsonl``), and a cost table
(``_costs.md``): each run's last evaluation with its wall time and generated tokens, counting the
pair generation (``--pairs-meta``) for the methods trained on pairs and the reward model's training
(``--rm``) for PPO.
The figure code is the package's (:mod:`dpo.report.figures`); ``dpo-report`` draws the same figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from costs import cost_table  # beside this script

from dpo.data.sources import bundled_path
from dpo.report.figures import frontier_points, over_seeds, plot_frontier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="sweep, run or Best-of-N folders")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"))
    parser.add_argument("--title", default="IMDB sentiment: reward vs KL")
    parser.add_argument("--pairs-meta", type=Path, default=Path(bundled_path("smollm2_vader.meta.json")),
                        help="the pairs' metadata (their generation's time and size)")  # fmt: skip
    parser.add_argument("--rm", type=Path, default=None, help="the reward model run PPO used (its cost)")
    parser.add_argument("--wandb", action="store_true", help="also log the plot and table to wandb")
    parser.add_argument("--wandb-project", default="dpo-imdb")
    args = parser.parse_args()
    points = frontier_points(args.roots)
    if not points:
        raise SystemExit(f"no eval.jsonl under {[str(r) for r in args.roots]}")
    settings = over_seeds(points)  # runs that differ only in their seed: one point, error bars over seeds
    plot_frontier(settings, args.out, args.title)
    table = args.out.with_suffix(".jsonl")
    table.write_text("".join(json.dumps(p) + "\n" for p in settings))
    print(f"{'method':<22} {'step/N':>6} {'KL':>8} {'reward':>8} {'s.e.':>6} {'seeds':>5} {'s.e. seeds':>10}")
    for p in sorted(settings, key=lambda p: (p["label"], p["step"])):
        se = f"{p['reward_se']:.3f}" if p.get("reward_se") is not None else "-"
        over = f"{p['reward_se_seeds']:.3f}" if p.get("reward_se_seeds") is not None else "-"
        print(f"{p['label']:<22} {p['step']:>6} {p['kl']:>8.3f} {p['reward']:>8.4f} {se:>6} {p['seeds']:>5} {over:>10}")
    costs = cost_table(points, args.pairs_meta, args.rm)  # per run
    costs_path = args.out.with_name(args.out.stem + "_costs.md")
    costs_path.write_text(costs)
    print(costs)
    print(f"wrote {args.out}, {table} and {costs_path}")
    if args.wandb:
        import wandb

        run = wandb.init(project=args.wandb_project, job_type="frontier")
        run.log({"frontier": wandb.Image(str(args.out)),
                 "points": wandb.Table(columns=list(points[0]), data=[list(p.values()) for p in points])})  # fmt: skip
        run.finish()


if __name__ == "__main__":
    main()
