"""The figures, from the files runs leave behind (no wandb needed): training curves from
``csv/metrics.csv``, the reward-vs-KL frontier from ``eval/eval.jsonl`` (and Best-of-N files), win
rate against temperature from ``dpo-eval``'s ``results.jsonl``. ``dpo-report`` draws them all;
``experiments/imdb/frontier.py`` and ``dpo-eval`` draw theirs with the same code.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo.report.naming import run_label
from dpo.runtime.io import DataError, atomic_write, read_jsonl
from dpo.systems import SYSTEMS

FAMILY_COLOURS = {"DPO": "tab:blue", "Preferred-FT": "tab:green", "Unlikelihood": "tab:orange",
                  "Best-of-N": "tab:red", "PPO": "tab:purple", "PPO-GT": "tab:brown", "Online DPO-GT": "tab:cyan",
                  "Online DPO": "tab:olive", "Iterative DPO-GT": "tab:pink", "Iterative DPO": "tab:gray",
                  "GRPO-GT": "darkgoldenrod", "GRPO": "gold", "RLOO-GT": "darkslateblue",
                  "RLOO": "slateblue"}  # fmt: skip

CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "rewards": [
        ("reward accuracy", ["train/rewards/accuracy", "val/rewards/accuracy"]),
        ("reward margin", ["train/rewards/margin", "val/rewards/margin"]),
        ("chosen reward", ["train/rewards/chosen", "val/rewards/chosen"]),
        ("rejected reward", ["train/rewards/rejected", "val/rewards/rejected"]),
    ],
    "loss": [("loss", ["train/loss", "val/loss"])],
    "kl": [
        ("KL(policy || reference) per token, chosen", ["train/kl/chosen_per_token", "val/kl/chosen_per_token"]),
        ("KL per sequence: chosen (teacher-forced), samples (exact)", ["train/kl/chosen", "val/kl/chosen", "eval/kl"]),
    ],
    "reward_model": [
        ("reward model accuracy", ["train/rm/accuracy", "val/rm/accuracy"]),
        ("reward model margin", ["train/rm/margin", "val/rm/margin"]),
    ],
    "ppo": [
        ("rollout reward (raw, KL-penalised)", ["train/ppo/reward", "train/ppo/reward_penalized"]),
        ("rollout KL per sequence (Monte-Carlo), KL coefficient", ["train/ppo/kl", "train/ppo/kl_coef"]),
        ("entropy per token", ["train/ppo/entropy"]),
        ("clip fraction, approximate KL", ["train/ppo/clip_frac", "train/ppo/approx_kl"]),
        ("value loss, explained variance", ["train/ppo/value_loss", "train/ppo/explained_variance"]),
    ],
    "health": [  # every system, every optimizer step (dpo.systems.base.System.on_train_batch_end)
        ("gradient norm before clipping", ["train/grad_norm"]),
        ("throughput: pair tokens per second, all ranks", ["train/tokens_per_s"]),
        ("peak memory, MB (CUDA allocated per step; CPU: process peak RSS)", ["train/peak_memory_mb"]),
    ],
}
"""Figure family -> its panels: (title, metrics). Every metric is one the trainer logs; the
dashboard (:mod:`dpo.report.dashboard`) shows the same panels."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    _pyplot().close(fig)
    return out


# --- runs and their logs ----------------------------------------------------------------------


@dataclass
class TrainRun:
    """A training run folder: its label and its logged metrics (metric -> [(step, value)])."""

    path: Path
    label: str
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def overrides_of(run_dir: Path) -> list[str] | None:
    """A run's command-line overrides (Hydra's ``.hydra/overrides.yaml``), if it kept them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not Hydra's overrides list ({type(e).__name__})") from None
    if not isinstance(overrides, list):
        raise DataError(f"{path}: not Hydra's overrides list (a {type(overrides).__name__})")
    return [str(o) for o in overrides]


def distinct_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Labels naming what tells the runs apart: the overrides not shared by all of them (a sweep's
    swept values), or the folder name of a run without overrides."""
    overrides = [overrides_of(d) for d in run_dirs]
    shared = set.intersection(*(set(o) for o in overrides if o is not None)) if any(overrides) else set()
    if len(run_dirs) == 1:
        shared = set()
    labels = []
    for d, o in zip(run_dirs, overrides, strict=True):
        own = [x for x in o or [] if x not in shared]
        labels.append(run_label("", own).strip() if own else d.name)
    return labels


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as metric -> [(step, value)] (Lightning's CSV: one row per step, blanks elsewhere).

    Raises:
        DataError: naming ``file:line`` and the column of a value that is not a number.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row or None in row.values():  # a row longer or shorter than the header
                    raise ValueError(f"a row of {len(row)} fields against a header of {len(reader.fieldnames)}")
                step = int(float(row.get("step") or 0))
                for key, value in row.items():
                    if value != "" and key not in ("step", "epoch"):
                        out.setdefault(key, []).append((step, float(value)))
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        line = reader.line_num if "reader" in locals() else 0
        raise DataError(f"{path}:{line}: not Lightning's metrics CSV ({e})") from None
    return out


def find_train_runs(roots: Sequence[Path]) -> list[TrainRun]:
    """Every training run (a folder with ``csv/metrics.csv``) under ``roots``, in path order."""
    paths = [p for root in roots for p in sorted(Path(root).rglob("csv/metrics.csv"))]
    dirs = [p.parent.parent for p in paths]
    return [TrainRun(d, label, read_metrics(p)) for d, p, label in zip(dirs, paths, distinct_labels(dirs), strict=True)]


# --- curves -----------------------------------------------------------------------------------


def plot_curves(runs: Sequence[TrainRun], family: str, path: Path) -> Path | None:
    """One figure of the family's panels, one line per run and metric (train solid, val dashed,
    samples dotted); None when no run logged any of its metrics."""
    panels = [(t, ms) for t, ms in CURVES[family] if any(m in r.metrics for r in runs for m in ms)]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"train": "-", "val": "--", "eval": ":"}
    for ax, (title, metrics) in zip(axes.flat, panels, strict=False):
        for i, run in enumerate(runs):
            for metric in metrics:
                points = run.metrics.get(metric)
                if points:
                    stage = metric.split("/", 1)[0]
                    ax.plot(*zip(*points, strict=True), styles.get(stage, "-"), color=colours[i % len(colours)],
                            marker="o" if len(points) < 8 else None, ms=3,
                            label=f"{run.label} [{stage}]")  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    legend = {}  # label -> handle, over every panel
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 2), 1, 1))
    return _save(fig, path)


# --- the frontier -------------------------------------------------------------------------------


def method_of(run_dir: Path) -> tuple[str, str]:
    """(family, label) of a training run from its ``config.yaml``, as its system names it
    (:attr:`dpo.systems.spec.SystemSpec.family`): the loss of a DPO-system run (DPO, Preferred-FT,
    Unlikelihood), ``PPO-GT`` or ``PPO`` for PPO."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg.setdefault("system", {"kind": "dpo"})
    spec = SYSTEMS.get(cfg["system"]["kind"])
    return spec.family(cfg) if spec is not None else (cfg["system"]["kind"],) * 2


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of ``values`` (None for fewer than 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _sample_rewards(eval_dir: Path, step: int) -> list[float]:
    """The per-sample rewards of a training run's evaluation at ``step`` (``step<N>.jsonl``)."""
    path = eval_dir / f"step{step:06d}.jsonl"
    if not path.is_file():
        return []
    return [row["reward"] for row in _jsonl(path)]


def _best_of_n_rewards(eval_path: Path, n: int) -> list[float]:
    """Each prompt's best reward among its first ``n`` samples, from ``scored.jsonl`` beside a
    Best-of-N ``eval.jsonl`` (empty when it is not there)."""
    scored = eval_path.parent / "scored.jsonl"
    if not scored.is_file():
        return []
    return [max(r["rewards"][:n]) for r in _jsonl(scored) if len(r["rewards"]) >= n]


def _jsonl(path: Path, required: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A JSONL file's rows (:func:`dpo.runtime.io.read_jsonl`: a malformed one names ``file:line``);
    an empty file has none."""
    return read_jsonl(path, required or {}, allow_empty=True)


def frontier_points(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """Every evaluation under ``roots`` as ``{family, label, step, kl, reward, reward_se, source}``: a
    training run's ``eval/eval.jsonl`` (method from its ``config.yaml``) or a Best-of-N file.
    ``reward_se`` is the standard error of the mean reward over the evaluation's samples (None when
    the samples are not beside it)."""
    points = []
    for root in roots:
        for path in sorted(Path(root).rglob("eval.jsonl")):
            for row in _jsonl(path, {"kl": (int, float), "reward": (int, float)}):
                seed = _seed_of(path)
                if row.get("method") == "best_of_n":
                    family, label, step = "Best-of-N", "Best-of-N", row["n"]
                    samples = _best_of_n_rewards(path, row["n"])
                    seed = row.get("seed") if isinstance(row.get("seed"), int) else None  # dpo-sample's
                elif (path.parent.parent / "config.yaml").is_file():
                    (family, label), step = method_of(path.parent.parent), row["step"]
                    samples = _sample_rewards(path.parent, row["step"])
                else:
                    continue
                points.append({"family": family, "label": label, "step": step, "kl": row["kl"],
                               "reward": row["reward"], "reward_se": standard_error(samples),
                               "seed": seed, "setting": _setting_of(path), "source": str(path)})  # fmt: skip
    return points


def _setting_of(eval_path: Path) -> str | None:
    """What a training run's command line set besides its seed (Hydra's overrides), if it kept them."""
    overrides = overrides_of(eval_path.parent.parent)
    return None if overrides is None else " ".join(sorted(o for o in overrides if not o.startswith("seed=")))


def _seed_of(eval_path: Path) -> int | None:
    """The seed of the run an ``eval.jsonl`` belongs to (its ``config.yaml``), if it has one."""
    config = eval_path.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    seed = (yaml.safe_load(config.read_text()) or {}).get("seed")
    return seed if isinstance(seed, int) else None


def over_seeds(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per setting (family, label, step and the overrides besides ``seed``): the points of
    runs that differ only in their seed (``-m seed=0,1,...``) become their mean, with ``seeds`` (how many),
    ``reward_se_seeds`` and ``kl_se_seeds`` (standard errors of the mean over seeds) and
    ``reward_se`` (the per-sample one of that mean: ``sqrt(sum se_i^2) / n``, where every seed's is
    known). A setting with one seed keeps its point, with ``seeds`` 1."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["family"], p["label"], p["step"], p.get("setting")), []).append(p)
    out = []
    for group in groups.values():
        seeds = [p.get("seed") for p in group]
        if len(group) == 1 or None in seeds or len(set(seeds)) < len(group):  # not seeds of one setting
            out += [{**p, "seeds": 1} for p in group]
            continue
        n = len(group)
        se = [p.get("reward_se") for p in group]
        out.append({
            **{k: group[0].get(k) for k in ("family", "label", "step", "setting")},
            "kl": sum(p["kl"] for p in group) / n, "reward": sum(p["reward"] for p in group) / n,
            "reward_se": math.sqrt(sum(x * x for x in se)) / n if None not in se else None,
            "reward_se_seeds": standard_error([p["reward"] for p in group]),
            "kl_se_seeds": standard_error([p["kl"] for p in group]),
            "seeds": n, "seed": sorted(p["seed"] for p in group), "source": [p["source"] for p in group],
        })  # fmt: skip
    return out


def plot_frontier(points: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Ground-truth reward against sequence-level KL, one colour per method (the paper's Fig. 2 left)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family in dict.fromkeys(p["family"] for p in points):
        mine = [p for p in points if p["family"] == family]
        colour = FAMILY_COLOURS.get(family)
        ax.scatter([p["kl"] for p in mine], [p["reward"] for p in mine], s=22, alpha=0.8, label=family, c=colour)
        bars = [p for p in mine if p.get("reward_se") is not None]
        ax.errorbar([p["kl"] for p in bars], [p["reward"] for p in bars], yerr=[p["reward_se"] for p in bars],
                    fmt="none", ecolor=colour, elinewidth=0.8, alpha=0.5)  # fmt: skip
        seeded = [p for p in mine if p.get("reward_se_seeds") is not None]  # over seeds: capped, both axes
        ax.errorbar([p["kl"] for p in seeded], [p["reward"] for p in seeded],
                    yerr=[p["reward_se_seeds"] for p in seeded], xerr=[p["kl_se_seeds"] for p in seeded],
                    fmt="none", ecolor=colour, elinewidth=1.2, capsize=3, alpha=0.9)  # fmt: skip
        if family == "Best-of-N":
            mine = sorted(mine, key=lambda p: p["kl"])
            ax.plot([p["kl"] for p in mine], [p["reward"] for p in mine], c=colour, lw=1, alpha=0.6)
            for p in mine:
                ax.annotate(f"N={p['step']}", (p["kl"], p["reward"]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(policy || reference), sequence level (nats)")
    ax.set_ylabel("ground-truth reward (held-out prompts)")
    ax.text(0.01, 0.01, "bars: standard error over samples; capped: over seeds", transform=ax.transAxes, fontsize=6)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# --- win rates ----------------------------------------------------------------------------------


def find_win_rates(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of every ``dpo-eval`` ``results.jsonl`` under ``roots``."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.jsonl")):
            rows += [r for r in _jsonl(path) if "win_rate" in r]
    return rows


def training_step(policy: str) -> int:
    """The optimizer step of a policy named after its export (``step000120`` -> 120)."""
    if not (policy.startswith("step") and policy[4:].isdigit()):
        raise ValueError(f"policy {policy!r} is not named after a step export (step<N>)")
    return int(policy[4:])


def plot_win_rate_over_training(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Win rate against optimizer step, one line per sampling temperature, standard errors as error
    bars (the paper's Fig. 3 right); ``rows`` are ``dpo-eval over_training=...``'s, policies ``step<N>``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for t in sorted({r["temperature"] for r in rows}):
        mine = sorted((r for r in rows if r["temperature"] == t), key=lambda r: training_step(r["policy"]))
        err = [0.0 if math.isnan(r["stderr"]) else r["stderr"] for r in mine]
        ax.errorbar([training_step(r["policy"]) for r in mine], [r["win_rate"] for r in mine], yerr=err, marker="o",
                    capsize=3, label=f"T={t:g}")  # fmt: skip
    return _win_rate_axes(fig, ax, rows, "optimizer step", title, path)


def plot_win_rates(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Win rate against sampling temperature, one line per policy, standard errors as error bars
    (the layout of the paper's Figs. 2 right and 3)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["temperature"])
        err = [0.0 if math.isnan(r["stderr"]) else r["stderr"] for r in mine]
        ax.errorbar([r["temperature"] for r in mine], [r["win_rate"] for r in mine], yerr=err, marker="o",
                    capsize=3, label=policy)  # fmt: skip
    return _win_rate_axes(fig, ax, rows, "sampling temperature", title, path)


def _win_rate_axes(fig: Any, ax: Any, rows: Sequence[dict[str, Any]], xlabel: str, title: str, path: str | Path
                   ) -> Path:  # fmt: skip
    """The win-rate figures' common frame: the 1/2 line, labels, the [0, 1] range; saved to ``path``."""
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"win rate against {rows[0]['baseline']}" if rows else "win rate")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return _save(fig, Path(path))
