"""A judge's agreement with human labels, beside the humans' agreement with each other (the DPO
paper's Sec. 6.4 asks this of GPT-4 before trusting its win rates).

Definitions (``dpo-eval agreement=true``; docs/win_rates.md repeats them):

- A labelled comparison is a prompt, two responses and the labels people gave it: each label is the
  response one person preferred. Rows of a preference data set with the same prompt and the same two
  responses are one comparison with several labels (TL;DR's comparisons hold several workers' choices
  for some pairs); a row alone is a comparison with one label.
- A judgment picks a response (or ties: 1/2 with every label, or is unreadable: left out). The
  judge's agreement on a comparison is the mean, over its readable judgments and its labels, of
  "the judge picked the labelled response"; with both A/B orders judged, the two judgments average
  first, as for win rates. The judge-human agreement is the mean over comparisons, its standard
  error their sample standard deviation over ``sqrt(n)`` (comparisons are the independent units).
- Human-human agreement, over the comparisons with two or more labels: per comparison the fraction
  of pairs of labels that agree, then the mean over comparisons and its standard error. It is the
  ceiling a judge is compared with: the judge-human number counts each label as one person's view,
  so a judge that always sided with the majority could exceed it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpo.config.settings import ConfigError, typed
from dpo.evaluation.win_rate import mean_and_stderr
from dpo.judges import JUDGES, Comparison, Judge, Template, build_judge
from dpo.judges.api import ApiJudge
from dpo.judges.base import JudgeError, Winner
from dpo.runtime.io import write_jsonl
from dpo.runtime.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Labelled:
    """One labelled comparison: ``prompt``, its two responses ``x`` and ``y`` (in the order first
    seen) and ``labels``, the response each person preferred (each one of ``x`` or ``y``)."""

    index: int
    prompt: str
    x: str
    y: str
    labels: tuple[str, ...]


def group_labelled(rows: Iterable[tuple[str, str, str]]) -> list[Labelled]:
    """Comparisons from ``(prompt, preferred, other)`` rows: rows of one prompt and one pair of
    responses (either order) are one comparison, each row one label. Rows whose two responses are
    equal carry no preference and are left out."""
    found: dict[tuple[str, frozenset[str]], tuple[str, str, list[str]]] = {}
    for prompt, preferred, other in rows:
        if preferred == other:
            continue
        key = (prompt, frozenset((preferred, other)))
        found.setdefault(key, (preferred, other, []))[2].append(preferred)
    return [Labelled(i, prompt, x, y, tuple(labels)) for i, ((prompt, _), (x, y, labels)) in enumerate(found.items())]


def human_agreement(labels: Sequence[str]) -> float | None:
    """The fraction of pairs of ``labels`` that agree; None below two labels."""
    pairs = list(combinations(labels, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def judge_score(picked: str | None, labels: Sequence[str]) -> float:
    """One judgment's agreement with a comparison's labels: the fraction of labels naming the
    response the judge picked; ``picked`` None is a tie (1/2)."""
    if picked is None:
        return 0.5
    return sum(label == picked for label in labels) / len(labels)


@dataclass(frozen=True)
class Agreement:
    """The agreement of one judge (and template) with the labels of ``n`` comparisons.

    Attributes:
        judge_human: mean over comparisons of the judge's agreement with their labels (NaN: none).
        judge_human_se: its standard error over comparisons.
        n: comparisons with a readable judgment.
        human_human: mean over comparisons with two or more labels of their labels' pairwise
            agreement (NaN: no such comparison).
        human_human_se: its standard error.
        n_multi: comparisons with two or more labels (whether or not the judge could be read).
        judgments: readable judgments; parse_failures: unreadable ones; ties: readable ties.
        a_wins / decided: of the readable non-tie judgments, those the response shown first won
            (the position bias, 0.5: none).
    """

    judge_human: float
    judge_human_se: float
    n: int
    human_human: float
    human_human_se: float
    n_multi: int
    judgments: int
    parse_failures: int
    ties: int
    a_wins: int
    decided: int

    @property
    def position_bias(self) -> float:
        return self.a_wins / self.decided if self.decided else float("nan")


def agreement(judged: Iterable[tuple[Labelled, Winner | None, bool]]) -> Agreement:
    """The agreement of ``(comparison, verdict, x shown first)`` judgments with the comparisons'
    labels; see the module docstring."""
    scores: dict[int, list[float]] = {}
    seen: dict[int, Labelled] = {}
    failures = ties = a_wins = decided = readable = 0
    for c, winner, x_first in judged:
        seen[c.index] = c
        if winner is None:
            failures += 1
            continue
        readable += 1
        if winner == "tie":
            ties += 1
            picked = None
        else:
            decided += 1
            a_wins += winner == "A"
            picked = c.x if (winner == "A") == x_first else c.y
        scores.setdefault(c.index, []).append(judge_score(picked, c.labels))
    judge_mean, judge_se = mean_and_stderr([sum(s) / len(s) for s in scores.values()])
    multi = [a for a in (human_agreement(c.labels) for c in seen.values()) if a is not None]
    human_mean, human_se = mean_and_stderr(multi)
    return Agreement(judge_mean, judge_se, len(scores), human_mean, human_se, len(multi), readable, failures, ties,
                     a_wins, decided)  # fmt: skip


# --- dpo-eval agreement=true ---------------------------------------------------------------------


def labelled_comparisons(cfg: DictConfig) -> list[Labelled]:
    """A seeded choice of ``n_prompts`` labelled comparisons of the data's ``split`` (in their order
    there): rows of one prompt and one pair of responses are one comparison, each row a label."""
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec

    rows, _ = load_rows(typed(cfg.data.source, SourceSpec), cfg.split, on_bad_row=cfg.data.on_bad_row)
    found = group_labelled((r.prompt, r.chosen, r.rejected) for r in rows)
    if not found:
        raise ConfigError(f"agreement=true: split {cfg.split!r} of data {cfg.data.source.path} has no comparison "
                          "of two different responses")  # fmt: skip
    keep = sorted(random.Random(cfg.seed).sample(range(len(found)), min(cfg.n_prompts, len(found))))
    multi = sum(len(found[i].labels) > 1 for i in keep)
    log.info(f"{len(keep)} of {len(found)} labelled comparisons of split {cfg.split!r} chosen (seed {cfg.seed}); "
             f"{multi} with several labels")  # fmt: skip
    return [found[i] for i in keep]


def agreement_table(rows: list[dict[str, Any]]) -> str:
    """``agreement.md``: one row per template (and judge)."""
    head = ("| template | judge | judge-human agreement | s.e. | n | human-human agreement | s.e. | n (several "
            "labels) | A won | parse failures | ties |\n|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    def num(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    return head + "".join(
        f"| {r['template']} | {judge_name(r['judge'])} | {num(r['judge_human'])} | {num(r['judge_human_se'])} | "
        f"{r['n']} | {num(r['human_human'])} | {num(r['human_human_se'])} | {r['n_multi']} | "
        f"{num(r['position_bias'], 2)} | {r['parse_failures']} | {r['ties']} |\n"
        for r in rows
    )


def judge_name(described: dict[str, Any]) -> str:
    """A judge in a few words: its kind and model (API), checkpoint file (local) or reward name."""
    reward = described.get("reward") or {}
    what = described.get("model") or described.get("pretrained") or reward.get("name") or ""
    return f"{described.get('kind')} {Path(str(what)).name if '/' in str(what) else what}".strip()


def judge_agreement(cfg: DictConfig, out: Path, api: ApiJudge | None, started: float) -> Path:
    """``agreement=true``: the judge on the data's labelled comparisons, against their labels."""
    chosen = labelled_comparisons(cfg)
    planned: list[tuple[Labelled, bool]] = []
    for c in chosen:
        if cfg.judge.orders == "both":
            planned += [(c, True), (c, False)]
        else:  # drawn per comparison from the seed, as for win rates
            planned.append((c, random.Random(f"{cfg.seed}:agreement:{c.index}").random() < 0.5))
    comparisons = [Comparison(c.prompt, *((c.x, c.y) if x_first else (c.y, c.x))) for c, x_first in planned]
    if cfg.dry_run:
        needed = api.uncached(comparisons) if api is not None else len(comparisons)
        log.info(f"dry run: {len(comparisons)} comparisons, {needed} judge requests to send; nothing judged")
        return out / "agreement.jsonl"
    template = typed(cfg.template, Template)
    judge: Judge = api if api is not None else build_judge(
        typed(cfg.judge, JUDGES[cfg.judge.kind].Config), template, cfg.paths.cache_dir
    )  # fmt: skip
    verdicts = judge.judge(comparisons)
    write_jsonl(out / "judgments.jsonl", [
        {"index": c.index, "prompt": c.prompt, "x": c.x, "y": c.y, "labels": list(c.labels),
         "order": "x_first" if x_first else "y_first", "a": cmp.a, "b": cmp.b, "raw": v.raw, "verdict": v.winner}
        for (c, x_first), cmp, v in zip(planned, comparisons, verdicts, strict=True)
    ])  # fmt: skip
    result = agreement((c, v.winner, x_first) for (c, x_first), v in zip(planned, verdicts, strict=True))
    if result.n == 0:
        raise JudgeError(f"no usable judgment: every answer was unreadable (each is in {out / 'judgments.jsonl'})")
    row = {"template": template.name, "judge": judge.describe(), "split": cfg.split, "comparisons": len(chosen),
           **{k: getattr(result, k) for k in ("judge_human", "judge_human_se", "n", "human_human", "human_human_se",
                                               "n_multi", "judgments", "parse_failures", "ties")},
           "position_bias": result.position_bias, "seconds": round(time.time() - started, 1)}  # fmt: skip
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}  # undefined: null
    path = write_jsonl(out / "agreement.jsonl", [row])
    (out / "agreement.md").write_text(agreement_table([row]), encoding="utf-8")
    log.info("agreement with the labels:\n%s", agreement_table([row]))
    return path
