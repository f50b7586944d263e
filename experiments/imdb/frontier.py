"""The reward-vs-KL frontier (the DPO paper's Fig. 2, left) from the runs of a sweep.

    python experiments/imdb/frontier.py outputs/imdb_mini/multiruns/<time> outputs/best_of_n/runs/<time> \
        --out experiments/imdb/frontier.png [--wandb]

Every folder given is searched for ``eval.jsonl`` files: a training run's (written by
``dpo.evaluation.reward_kl.RewardKLEval``, one row per evaluation, the method read from the run's
``config.yaml``) or a Best-of-N file (rows with ``"method": "best_of_n"``). One point per
evaluation, one colour per method; a table of the points is printed and written beside the PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

FAMILY_COLOURS = {"DPO": "tab:blue", "Preferred-FT": "tab:green", "Unlikelihood": "tab:orange",
                  "Best-of-N": "tab:red"}  # fmt: skip


def method_of(run_dir: Path) -> tuple[str, str]:
    """(family, label) of a training run from its ``config.yaml``."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    loss = cfg["loss"]
    name = loss["name"]
    if name == "sft":
        return "Preferred-FT", "Preferred-FT"
    if name == "unlikelihood":
        return "Unlikelihood", f"Unlikelihood a={loss['alpha']:g}"
    if name == "dpo":
        return "DPO", f"DPO b={loss['beta']:g}"
    return name, f"{name} " + " ".join(f"{k}={v}" for k, v in loss.items() if k not in ("name", "nll_weight"))


def collect(roots: list[Path]) -> list[dict]:
    """Every evaluation point under ``roots`` as ``{family, label, step, kl, reward, source}``."""
    points = []
    for root in roots:
        for path in sorted(root.rglob("eval.jsonl")):
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            for row in rows:
                if row.get("method") == "best_of_n":
                    points.append({"family": "Best-of-N", "label": "Best-of-N", "step": row["n"], "kl": row["kl"],
                                   "reward": row["reward"], "source": str(path)})  # fmt: skip
                    continue
                run_dir = path.parent.parent  # <run>/eval/eval.jsonl
                family, label = method_of(run_dir)
                points.append({"family": family, "label": label, "step": row["step"], "kl": row["kl"],
                               "reward": row["reward"], "source": str(path)})  # fmt: skip
    return points


def plot(points: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    families = list(dict.fromkeys(p["family"] for p in points))
    for family in families:
        mine = [p for p in points if p["family"] == family]
        colour = FAMILY_COLOURS.get(family)
        ax.scatter([p["kl"] for p in mine], [p["reward"] for p in mine], s=22, alpha=0.8, label=family, c=colour)
        if family == "Best-of-N":
            mine = sorted(mine, key=lambda p: p["kl"])
            ax.plot([p["kl"] for p in mine], [p["reward"] for p in mine], c=colour, lw=1, alpha=0.6)
            for p in mine:
                ax.annotate(f"N={p['step']}", (p["kl"], p["reward"]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(policy || reference), sequence level (nats)")
    ax.set_ylabel("ground-truth reward (held-out prompts)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="sweep, run or Best-of-N folders")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"))
    parser.add_argument("--title", default="IMDB sentiment: reward vs KL")
    parser.add_argument("--wandb", action="store_true", help="also log the plot and table to wandb")
    parser.add_argument("--wandb-project", default="dpo-imdb")
    args = parser.parse_args()
    points = collect(args.roots)
    if not points:
        raise SystemExit(f"no eval.jsonl under {[str(r) for r in args.roots]}")
    plot(points, args.out, args.title)
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
