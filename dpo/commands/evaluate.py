"""`dpo-eval`: win rates of policies against a baseline, judged pairwise, across temperatures.

    dpo-eval data=tldr_sft template=summary judge=api policies='{sft: <sft>/hf, dpo: <dpo>/hf}'
    dpo-eval data=hh template=dialogue judge=api policies='{sft: ..., dpo: ...}' baseline=chosen
    dpo-eval ... completions=<completions.jsonl>     # judge given completions (e.g. Best-of-N picks)
    dpo-eval ... dry_run=true                        # sample, count the judge's requests, stop
    dpo-eval data=tldr template=paper_summary_c judge=api agreement=true   # the judge against human labels
    dpo-eval data=hh template=paper_dialogue judge=api over_training=<run folder>   # win rate over training

The paper's protocol (Sec. 6.2, App. C.2): for held-out prompts (a seeded choice of ``n_prompts``),
each policy samples one completion at each temperature; a judge compares it with the baseline's
response (the data's ``chosen``: TL;DR's reference summary, HH's preferred answer; or another
policy's sample at the same temperature), the A/B order drawn per comparison from the seed (or both
orders, ``judge.orders=both``). A prompt that does not fit a model's context with
``generation.max_new_tokens`` more tokens is skipped and counted, never cut.

Writes into the run folder: ``prompts.jsonl`` (the chosen prompts: ``dpo-sample prompts.file=<it>``
samples a Best-of-N stage on exactly these), ``completions.jsonl`` (every sample),
``judgments.jsonl`` (prompt, both texts, order, the judge's raw output, verdict), ``results.jsonl``
and ``results.md`` (per policy and temperature: win rate, standard error, n, parse failures,
skipped prompts, position bias), ``win_rate.png``; with ``wandb=true`` the table and plot go to
wandb as well. The definitions are in :mod:`dpo.evaluation.win_rate`.

``agreement=true`` judges the data's own labelled comparisons instead (no policies): the ``split``'s
rows, those of one prompt and one pair of responses grouped into one comparison with several labels,
a seeded choice of ``n_prompts`` of them; it writes ``judgments.jsonl``, ``agreement.jsonl`` and
``agreement.md``: the judge's agreement with the human labels, the humans' agreement with each other
where a comparison has several labels, the position bias, with standard errors
(:mod:`dpo.evaluation.agreement`). Sweep ``-m template=paper_summary_s,paper_summary_c`` for one row
per template.

``over_training=<run folder>`` judges the run's policy exports (``callbacks.step_exports.every_n_steps``:
``exports/step<N>/``) as the policies ``step<N>`` (besides any given, e.g. a baseline) and also draws
``win_rate_over_training.png``: win rate against optimizer step, one line per temperature (the
paper's Fig. 3 right).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dpo.commands.cli import entry
from dpo.config.schema import EvalConfig
from dpo.config.secrets import redact
from dpo.config.settings import ConfigError, check_ranges, require_keys, typed
from dpo.evaluation.agreement import judge_agreement
from dpo.evaluation.prompts import Prompt, choose_prompts, few_shot_prefixes
from dpo.evaluation.step_exports import step_exports
from dpo.evaluation.win_rate import WinRate, win_rate
from dpo.judges import JUDGES, ORDERS, Comparison, Judge, Template, build_judge
from dpo.judges.api import ApiJudge
from dpo.judges.base import JudgeError
from dpo.models.completions import sample_texts
from dpo.models.load import DType, ModelConfig, load_policy, load_tokenizer, resolve
from dpo.models.sampling import SweepGeneration
from dpo.report.figures import plot_win_rate_over_training, plot_win_rates, training_step
from dpo.report.wandb_logging import WIN_RATES_TABLE
from dpo.runtime.io import read_jsonl, write_json, write_jsonl
from dpo.runtime.log import get_logger

log = get_logger(__name__)

CHOSEN = "chosen"
"""``baseline=chosen``: the data's preferred response of each prompt."""

STEP_NAME = re.compile(r"step\d+")
"""The policy names ``over_training`` gives a run's exports."""

Texts = dict[tuple[str, float], list[str | None]]
"""(policy, temperature) -> one completion per prompt (None: skipped)."""


@dataclass(frozen=True)
class Planned:
    """One comparison to judge, with what it means for the policy."""

    policy: str
    temperature: float
    prompt: Prompt
    policy_text: str
    baseline_text: str
    policy_first: bool

    def comparison(self) -> Comparison:
        a, b = (self.policy_text, self.baseline_text) if self.policy_first else (self.baseline_text, self.policy_text)
        return Comparison(self.prompt.text, a, b)


def check(cfg: DictConfig) -> None:
    """The config's mistakes, before any model loads."""
    require_keys(cfg, ["judge.kind", "template.user", "paths.output_dir"])
    check_ranges(cfg, EvalConfig)  # temperatures, n_prompts, batch_size, dtype: every range at once
    if cfg.over_training is not None:
        if cfg.agreement or any(STEP_NAME.fullmatch(str(name)) for name in cfg.policies or {}):
            raise ConfigError("over_training=<run folder> judges the run's exports as policies step<N>: the other "
                              "policies (e.g. a baseline) need other names, and agreement must be false")  # fmt: skip
        if not step_exports(cfg.over_training):
            raise ConfigError(f"over_training={cfg.over_training}: no policy exports under "
                              f"{Path(cfg.over_training) / 'exports'}; train with "
                              "callbacks.step_exports.every_n_steps=N")  # fmt: skip
    if cfg.agreement:
        if cfg.data is None or cfg.prompts_file is not None or cfg.policies or cfg.completions:
            raise ConfigError("agreement=true judges a data config's labelled comparisons: set data=... and its "
                              "split, without prompts_file, policies or completions")  # fmt: skip
    elif (cfg.data is None) == (cfg.prompts_file is None):
        raise ConfigError("dpo-eval: give prompts through a data config (data=hh) or prompts_file, not both")
    if cfg.baseline == CHOSEN and cfg.data is None:
        raise ConfigError("baseline=chosen takes the data's preferred responses: set data=..., or a policy as baseline")
    if not cfg.agreement and not cfg.policies and not cfg.completions and cfg.over_training is None:
        raise ConfigError("dpo-eval: set policies (name: model folder or hub id) or completions (a JSONL)")
    if cfg.policies is not None and (
        not isinstance(cfg.policies, DictConfig) or not all(isinstance(v, str) for v in cfg.policies.values())
    ):
        raise ConfigError(f"policies must map names to model folders or hub ids, got {cfg.policies}")
    if cfg.baseline != CHOSEN and cfg.policies and cfg.baseline not in cfg.policies:
        raise ConfigError(f"baseline={cfg.baseline!r} is neither 'chosen' nor a name in policies {list(cfg.policies)}")
    for name, shots in (cfg.few_shot or {}).items():
        if name not in (cfg.policies or {}) and cfg.over_training is None:
            raise ConfigError(f"few_shot.{name}: no policy {name!r} in policies {list(cfg.policies or {})}")
        if isinstance(shots, bool) or not isinstance(shots, int | str) or (isinstance(shots, int) and shots < 1):
            raise ConfigError(f"few_shot.{name}={shots!r}: a number of examples (>= 1, drawn from the data's "
                              "few_shot_split) or a text file holding the prefix")  # fmt: skip
        if isinstance(shots, int) and cfg.data is None:
            raise ConfigError(f"few_shot.{name}={shots}: examples come from a data config (data=...)")
        if isinstance(shots, str) and not Path(shots).is_file():
            raise ConfigError(f"few_shot.{name}={shots}: no such file")
    if cfg.judge.kind not in JUDGES:
        raise ConfigError(f"judge.kind={cfg.judge.kind!r}: choose one of {sorted(JUDGES)}")
    typed(cfg.judge, JUDGES[cfg.judge.kind].Config)  # the judge's own checks (api: URL, bounds, key variable)
    if cfg.judge.orders not in ORDERS:
        raise ConfigError(f"judge.orders={cfg.judge.orders!r}: choose one of {ORDERS}")
    try:
        typed(cfg.template, Template)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"dpo-eval: {e}") from None


def sample_policies(cfg: DictConfig, names: list[str], prompts: list[Prompt]) -> Texts:
    """One completion per prompt of each policy at each temperature (policies loaded one at a time);
    a ``few_shot`` policy samples after its prefix."""
    out: Texts = {}
    prefixes = few_shot_prefixes(cfg)
    for name in names:
        m = resolve(ModelConfig(cfg.policies[name], dtype=DType(cfg.dtype)), cfg.paths.cache_dir)
        tokenizer, model = load_tokenizer(m.pretrained), load_policy(m)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        for k, t in enumerate(cfg.temperatures):
            gen = typed(cfg.generation, SweepGeneration).at(float(t))
            torch.manual_seed(cfg.seed + k)  # every policy meets the same seed at a temperature
            sampled = sample_texts(model, tokenizer, [prefixes.get(name, "") + p.text for p in prompts], gen,
                                   batch_size=cfg.batch_size,
                                   progress=f"sample {name} at T={t}")  # fmt: skip
            out[(name, float(t))] = [None if s is None else s[0] for s in sampled.texts]
            if sampled.skipped:
                log.warning(f"{name}: {sampled.skipped} prompts do not fit its context with "
                            f"{gen.max_new_tokens} new tokens: skipped (prompts are never cut)")  # fmt: skip
        del model
    return out


def read_completions(path: str, prompts: list[Prompt]) -> Texts:
    """Completions from a JSONL (``policy``, ``temperature``, ``prompt``, ``completion``); a prompt
    with no row for a (policy, temperature) counts as skipped there."""
    index = {p.text: i for i, p in enumerate(prompts)}
    out: Texts = {}
    try:
        rows = read_jsonl(path, {"policy": str, "temperature": (int, float), "prompt": str, "completion": str})
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"completions: {e}") from None
    for row in rows:
        texts = out.setdefault((row["policy"], float(row["temperature"])), [None] * len(prompts))
        if row["prompt"] in index:
            texts[index[row["prompt"]]] = row["completion"]
    if not out:
        raise ConfigError(f"completions={path}: no rows")
    return out


def plan(cfg: DictConfig, prompts: list[Prompt], texts: Texts, orders: str) -> tuple[list[Planned], dict]:
    """The comparisons to judge, and the skipped prompts per (policy, temperature)."""
    planned, skipped = [], {}
    policies = [p for p in dict.fromkeys(p for p, _ in texts) if p != cfg.baseline]
    for policy in policies:
        for t in cfg.temperatures:
            key = (policy, float(t))
            if key not in texts:
                raise ConfigError(f"no completions of policy {policy!r} at temperature {t}")
            base = [p.chosen for p in prompts] if cfg.baseline == CHOSEN else texts.get((cfg.baseline, float(t)))
            if base is None:
                raise ConfigError(f"no completions of the baseline {cfg.baseline!r} at temperature {t}")
            skipped[key] = 0
            for i, p in enumerate(prompts):
                mine, theirs = texts[key][i], base[i]
                if mine is None or theirs is None:
                    skipped[key] += 1
                    continue
                if orders == "both":
                    firsts = [True, False]
                else:  # drawn per comparison from the seed: the same comparison gets the same order in a rerun
                    firsts = [random.Random(f"{cfg.seed}:{policy}:{float(t)}:{p.index}").random() < 0.5]
                planned += [Planned(policy, float(t), p, mine, theirs, first) for first in firsts]
    return planned, skipped


def results_table(rows: list[dict[str, Any]]) -> str:
    """``results.md``: one row per (policy, temperature)."""
    head = ("| policy | T | win rate | s.e. | n | parse failures | skipped | ties | A won |\n"
            "|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    return head + "".join(
        f"| {r['policy']} | {r['temperature']:g} | {r['win_rate']:.3f} | {r['stderr']:.3f} | {r['n']} | "
        f"{r['parse_failures']} | {r['skipped_prompts']} | {r['ties']} | {r['position_bias']:.2f} |\n"
        for r in rows
    )


def log_to_wandb(cfg: DictConfig, rows: list[dict[str, Any]], figure: Path, over_training: Path | None = None) -> None:
    """The results as a wandb table, a line plot per policy and the figure (``wandb=true``); with
    ``over_training``, also win rate against step (a line per temperature) and its figure."""
    import wandb

    run = wandb.init(project=cfg.wandb_project, name=f"{cfg.task_name}/{cfg.run_name}", dir=cfg.paths.output_dir,
                     job_type="eval", config=redact(OmegaConf.to_container(cfg, resolve=True)))  # fmt: skip
    try:
        columns = ["policy", "temperature", "win_rate", "stderr", "n", "parse_failures", "skipped_prompts"]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        run.log({
            WIN_RATES_TABLE: table,
            "eval/win_rate_plot": wandb.plot.line(table, "temperature", "win_rate", stroke="policy",
                                                  title=f"win rate against {cfg.baseline}"),
            "eval/win_rate_figure": wandb.Image(str(figure)),
        })  # fmt: skip
        if over_training is not None:
            steps = [[training_step(r["policy"]), r["temperature"], r["win_rate"], r["stderr"]] for r in rows
                     if STEP_NAME.fullmatch(r["policy"])]
            by_step = wandb.Table(columns=["step", "temperature", "win_rate", "stderr"], data=steps)
            run.log({"eval/win_rate_over_training": wandb.plot.line(by_step, "step", "win_rate", stroke="temperature",
                                                                    title="win rate over training"),
                     "eval/win_rate_over_training_figure": wandb.Image(str(over_training))})  # fmt: skip
    finally:
        run.finish()


def evaluate(cfg: DictConfig) -> Path:
    """Run the evaluation; returns ``results.jsonl`` (``agreement.jsonl`` with ``agreement=true``)."""
    check(cfg)
    started = time.time()
    out = Path(cfg.paths.output_dir)
    if cfg.judge.kind == "api":  # the key's presence is checked before any sampling
        typed_judge = typed(cfg.judge, JUDGES["api"].Config)
        api = ApiJudge(typed_judge, typed(cfg.template, Template), dry_run=cfg.dry_run)
    if cfg.agreement:
        return judge_agreement(cfg, out, api if cfg.judge.kind == "api" else None, started)
    if cfg.over_training is not None and not cfg.completions:  # the run's exports are the policies
        with open_dict(cfg):  # besides the given policies (a baseline, say)
            cfg.policies = {**(cfg.policies or {}),
                            **{f"step{n:06d}": str(path) for n, path in step_exports(cfg.over_training).items()}}
    prompts, texts = prompts_and_completions(cfg, out)
    planned, skipped = plan(cfg, prompts, texts, cfg.judge.orders)
    comparisons = [x.comparison() for x in planned]
    if cfg.dry_run:
        needed = api.uncached(comparisons) if cfg.judge.kind == "api" else len(comparisons)
        log.info(f"dry run: {len(comparisons)} comparisons, {needed} judge requests to send; nothing judged")
        return out / "completions.jsonl"
    judge: Judge = api if cfg.judge.kind == "api" else build_judge(
        typed(cfg.judge, JUDGES[cfg.judge.kind].Config), typed(cfg.template, Template), cfg.paths.cache_dir
    )  # fmt: skip
    verdicts = judge.judge(comparisons)
    write_jsonl(out / "judgments.jsonl", [
        {"policy": x.policy, "baseline": cfg.baseline, "temperature": x.temperature, "prompt_index": x.prompt.index,
         "prompt": x.prompt.text, "policy_text": x.policy_text, "baseline_text": x.baseline_text,
         "order": "policy_first" if x.policy_first else "baseline_first", "a": c.a, "b": c.b, "raw": v.raw,
         "verdict": v.winner}
        for x, c, v in zip(planned, comparisons, verdicts, strict=True)
    ])  # fmt: skip
    rows = win_rate_rows(cfg.baseline, planned, verdicts, skipped, judge.describe())
    empty = [f"{r['policy']} at temperature {r['temperature']:g}" for r in rows if r["n"] == 0]
    rows = [r for r in rows if r["n"] > 0]  # a win rate over no judgment is no number (not NaN)
    results = write_jsonl(out / "results.jsonl", rows)
    if empty:
        raise JudgeError(
            f"no usable judgment for {', '.join(empty)}: every answer was unreadable or every prompt was "
            f"skipped (each answer is in {out / 'judgments.jsonl'}, 'raw'); {len(rows)} other win rate(s) "
            f"in {results}"
        )
    (out / "results.md").write_text(results_table(rows), encoding="utf-8")
    figure, over = draw(cfg, rows, out, f"judge {judge.describe().get('kind')}, {len(prompts)} prompts")
    few_shot = OmegaConf.to_container(cfg.few_shot) if cfg.few_shot else {}
    write_json(out / "eval.meta.json", {"seconds": round(time.time() - started, 1), "prompts": len(prompts),
                                        "comparisons": len(comparisons), "judge": judge.describe(),
                                        "few_shot": few_shot})  # fmt: skip
    if cfg.wandb:
        log_to_wandb(cfg, rows, figure, over)
    log.info("win rates against %s:\n%s", cfg.baseline, results_table(rows))
    bias = [r["position_bias"] for r in rows if not math.isnan(r["position_bias"])]
    if bias and cfg.judge.orders == "both":
        log.info(f"position bias: the response shown first won {sum(bias) / len(bias):.2f} of decided judgments")
    return results


def draw(cfg: DictConfig, rows: list[dict[str, Any]], out: Path, about: str) -> tuple[Path, Path | None]:
    """``win_rate.png`` (against temperature) and, with ``over_training``, ``win_rate_over_training.png``
    (the exports' win rates against step)."""
    figure = plot_win_rates(rows, out / "win_rate.png", f"{cfg.task_name}: {about}")
    if cfg.over_training is None:
        return figure, None
    steps = [r for r in rows if STEP_NAME.fullmatch(r["policy"])]
    return figure, plot_win_rate_over_training(steps, out / "win_rate_over_training.png",
                                               f"{Path(cfg.over_training).name}: {about}")  # fmt: skip


def prompts_and_completions(cfg: DictConfig, out: Path) -> tuple[list[Prompt], Texts]:
    """The chosen prompts and every policy's completions of them: read from ``completions``, or
    sampled (then written to ``completions.jsonl``)."""
    first_model = next(iter((cfg.policies or {}).values()), None)
    tokenizer = (
        load_tokenizer(resolve(ModelConfig(first_model), cfg.paths.cache_dir).pretrained) if first_model else None
    )
    prompts = choose_prompts(cfg, tokenizer)
    write_jsonl(out / "prompts.jsonl", [{"prompt_index": p.index, "prompt": p.text} for p in prompts])  # for Best-of-N
    if cfg.completions:
        return prompts, read_completions(cfg.completions, prompts)
    names = [n for n in cfg.policies if n != cfg.baseline] + [n for n in cfg.policies if n == cfg.baseline]
    texts = sample_policies(cfg, names, prompts)
    write_jsonl(out / "completions.jsonl", [
        {"policy": p, "temperature": t, "prompt_index": prompts[i].index, "prompt": prompts[i].text, "completion": c}
        for (p, t), cs in texts.items() for i, c in enumerate(cs) if c is not None
    ])  # fmt: skip
    return prompts, texts


def win_rate_rows(baseline: str, planned: list[Planned], verdicts: list[Any], skipped: dict,
                  judge: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (policy, temperature): its win rate against ``baseline`` and how it was measured."""
    grouped: dict[tuple[str, float], list] = defaultdict(list)
    for x, v in zip(planned, verdicts, strict=True):
        grouped[(x.policy, x.temperature)].append((x.prompt.index, v.winner, x.policy_first))
    rows = []
    for key, n_skipped in skipped.items():
        w: WinRate = win_rate(grouped.get(key, []))
        rows.append({
            "policy": key[0], "baseline": baseline, "temperature": key[1], "win_rate": w.win_rate,
            "stderr": w.stderr, "n": w.n, "judgments": w.judgments, "parse_failures": w.parse_failures,
            "skipped_prompts": n_skipped, "ties": w.ties, "position_bias": w.position_bias, "judge": judge,
        })  # fmt: skip
    return rows


@entry("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
