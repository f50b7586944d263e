"""The config schema: one typed dataclass per config group, registered in Hydra's ConfigStore.

Each schema lives beside the code it configures and is the single source of that group's keys
and types; the YAML files under ``conf/<group>/`` are its instances, and each names its schema in
the first line of its defaults list (``- /schema/<group>@_here_`` or, for groups whose keys depend
on the choice, ``- /schema/<group>@_here_: <choice>``):

==============  =====================================================================
group           schema
==============  =====================================================================
model           :class:`dpo.models.load.ModelConfig`
data            :class:`dpo.data.datamodule.DataConfig` (``source``: :class:`dpo.data.sources.SourceSpec`)
optim           :class:`dpo.systems.base.OptimConfig`
reference       each kind's ``Config`` in :data:`dpo.systems.reference.REFERENCES`
system          each kind's ``config`` in :data:`dpo.systems.SYSTEMS`
loss            the loss function's keyword parameters (:data:`dpo.maths.losses.LOSSES`) plus
                ``name``, ``nll_weight`` and the modifiers (:func:`dpo.config.signatures.loss_schema`)
reward          the reward factory's parameters (:data:`dpo.rewards.registry.REWARDS`) plus ``name``
judge           each kind's ``Config`` in :data:`dpo.judges.JUDGES`
template        :class:`dpo.judges.Template`
paths           :class:`PathsConfig`
(root)          :class:`TrainConfig` (``conf/train.yaml``), :class:`EvalConfig` (``conf/eval.yaml``),
                the pipeline commands' (:data:`PIPELINE`: ``conf/sample.yaml``, ...)
==============  =====================================================================

So an unknown key, a wrong type or an invalid choice fails by name when Hydra composes the config;
:func:`dpo.config.validate.check_schema` repeats the key check on the composed config (``+key=value``
overrides can add keys Hydra does not type). Third-party groups (trainer, callbacks, logger,
launcher) configure classes through ``_target_``; their keys are checked against the target's
signature (:func:`dpo.config.validate.check_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dpo.config.preflight import PreflightConfig
from dpo.config.signatures import loss_schema, reward_schema
from dpo.data.datamodule import DataConfig
from dpo.data.sources import bundled_path
from dpo.judges import JUDGES, Template
from dpo.maths.losses import LOSSES, MIXTURE
from dpo.models.load import DType, ModelConfig
from dpo.models.sampling import GenerationConfig, SweepGeneration, generation_problem
from dpo.report.naming import resolve_run_group, resolve_run_label
from dpo.rewards.registry import REWARDS
from dpo.runtime.checks import refuse
from dpo.systems import SYSTEMS
from dpo.systems.base import GuardConfig, OptimConfig
from dpo.systems.reference import REFERENCES


@dataclass
class PathsConfig:
    """``conf/paths``: where runs write and what they share.

    Attributes:
        log_dir: root of the run folders (``<log_dir>/<task_name>/runs/<time>``).
        output_dir: this run's folder: config, logs, checkpoints, the ``hf`` export.
        cache_dir: tokenized data, reference log-probs and converted models, shared by a sweep's jobs.
    """

    log_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    """The root of ``dpo-train``'s config (``conf/train.yaml``).

    Attributes:
        task_name: names the run folder (``outputs/<task_name>/...``) and the wandb run.
        run_name: the run's folder under ``outputs/<task_name>/runs/`` (a sweep's under
            ``multiruns/``); the same name again resumes the run (:mod:`dpo.runtime.run`). Default: the time.
        seed: seeds weights built from a config, data order and sampling.
        ckpt_path: ``auto``: resume from the run folder's last checkpoint if there is one; null:
            start fresh; or a Lightning checkpoint to resume from (its optimizer state included).
        optimized_metric: the metric returned to Hydra sweepers (e.g. Optuna).
        tags: wandb tags.
        run_group: wandb group; sweeps set it so their runs line up in one dashboard.
        guard: what a non-finite loss or gradient, too-small updates and changed data on resume do.
        log_export: upload the ``hf`` export as a wandb model artifact (with a wandb logger).
        preflight: estimate memory and step time per rank and refuse what cannot fit, instead of
            training (:mod:`dpo.config.preflight`).
    """

    task_name: str = "train"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    seed: int = 0
    ckpt_path: str | None = "auto"
    optimized_metric: str | None = "val/rewards/accuracy"
    tags: list[str] = field(default_factory=list)
    run_group: str | None = None
    guard: GuardConfig = field(default_factory=GuardConfig)
    log_export: bool = False
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    # The groups: ours carry their own schema (above), third-party ones are checked by target.
    model: Any = MISSING
    data: Any = MISSING
    system: Any = MISSING
    loss: Any = MISSING
    optim: Any = MISSING
    reward: Any = MISSING
    reference: Any = MISSING
    paths: Any = MISSING
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    callbacks: Any = field(default_factory=dict)


@dataclass
class EvalConfig:
    """The root of ``dpo-eval``'s config (``conf/eval.yaml``); see :mod:`dpo.commands.evaluate`.

    Attributes:
        task_name: names the output folder (``outputs/<task_name>/runs/<run_name>``).
        run_name: the output folder's name; default: the time.
        seed: seeds the choice of prompts, the A/B orders and sampling.
        policies: name -> model (an ``hf`` export folder, hub id or ``pypi-gguf:``) to sample from.
        baseline: ``chosen``: the data's preferred (TL;DR: reference) response of each prompt; or the
            name of one of ``policies``, sampled at the same temperature as the policy it meets.
        temperatures: sampling temperatures (0: greedy). Paper: 0, 0.25, 0.5, 0.75, 1.0.
        n_prompts: held-out prompts judged (a seeded choice; all if fewer).
        split: the data split the prompts come from.
        prompts_file: prompts from a file instead of ``data`` (text, one per line, or JSONL with
            ``prompt``); the baseline must then be a policy.
        completions: a JSONL of completions to judge instead of sampling (rows: ``policy``,
            ``temperature``, ``prompt``, ``completion``; e.g. an earlier run's ``completions.jsonl``).
        dtype: parameter dtype the policies are loaded in.
        batch_size: prompts per ``generate`` call.
        generation: sampling settings besides the temperature; ``max_new_tokens`` and ``stop``
            default to the data config's ``response``.
        dry_run: sample (or read) the completions, count the judge requests a run would send, stop.
        agreement: judge the data's own labelled comparisons (``split``; ``n_prompts`` of them) and
            report the judge's agreement with the labels and the labels' with each other, instead
            of win rates (:mod:`dpo.evaluation.agreement`); no policies.
        few_shot: policy name -> its prompt prefix while sampling: a number of examples (prompt and
            chosen response, drawn with the seed from the data's ``few_shot_split``; the paper's HH
            Pythia-2.8B 2-shot baseline: ``{pythia: 2}``) or a text file holding the prefix. The
            judge sees the prompt without it.
        few_shot_split: the data split the few-shot examples come from.
        over_training: a training run's folder: its policy exports (``exports/step<N>/``, written with
            ``callbacks.step_exports.every_n_steps``) are policies ``step<N>`` (beside any in
            ``policies``, e.g. a baseline), and win rate against step is drawn too
            (``win_rate_over_training.png``).
        wandb: log the results table and plot to wandb (``WANDB_MODE`` decides online/offline).
        wandb_project: the wandb project.
    """

    task_name: str = "eval"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    seed: int = 0
    policies: Any = None
    baseline: str = "chosen"
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    n_prompts: int = 256
    split: str = "val"
    prompts_file: str | None = None
    completions: str | None = None
    dtype: str = "float32"
    batch_size: int = 16
    generation: SweepGeneration = field(default_factory=lambda: SweepGeneration())
    dry_run: bool = False
    agreement: bool = False
    over_training: str | None = None
    few_shot: Any = None
    few_shot_split: str = "train"
    wandb: bool = False
    wandb_project: str = "dpo"
    data: Any = None
    judge: Any = MISSING
    template: Any = MISSING
    paths: Any = MISSING

    def __post_init__(self) -> None:
        refuse((
            ("temperatures", self.temperatures, bool(self.temperatures) and min(self.temperatures) >= 0,
             "a non-empty list of values >= 0"),
            ("n_prompts", self.n_prompts, self.n_prompts >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("dtype", self.dtype, self.dtype in {d.value for d in DType}, f"one of {[d.value for d in DType]}"),
        ), generation_problem(self.generation.at(1.0)))  # fmt: skip


@dataclass
class SamplePrompts:
    """``dpo-sample``'s ``prompts``: a file (JSONL ``field`` per row, or text) or ``data``'s ``split``."""

    file: str | None = None
    field: str = "prompt"
    split: str = "train"
    max_prompts: int | None = None


@dataclass
class SampleConfig:
    """The root of ``dpo-sample``'s config (``conf/sample.yaml``); see :mod:`dpo.commands.sample`."""

    task_name: str = "sample"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    seed: int = 0
    prompts: SamplePrompts = field(default_factory=SamplePrompts)
    n: int = 4
    batch_size: int = 16
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: str = MISSING
    model: Any = MISSING
    data: Any = None
    paths: Any = MISSING

    def __post_init__(self) -> None:
        max_prompts = self.prompts.max_prompts  # 0 took every prompt, -1 all but the last
        refuse((("n", self.n, self.n >= 1, ">= 1"), ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
                   ("prompts.max_prompts", max_prompts, max_prompts is None or max_prompts >= 1,
                    "a whole number >= 1 (null: every prompt)")), generation_problem(self.generation))  # fmt: skip


@dataclass
class ScoreConfig:
    """The root of ``dpo-score``'s config (``conf/score.yaml``); see :mod:`dpo.commands.score`."""

    task_name: str = "score"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    input: str = MISSING
    output: str = MISSING
    include_prompt: bool = True
    batch_size: int = 64
    reward: Any = MISSING
    paths: Any = MISSING

    def __post_init__(self) -> None:
        refuse((("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),))


@dataclass
class PairConfig:
    """The root of ``dpo-pair``'s config (``conf/pair.yaml``); see :mod:`dpo.commands.pair`."""

    task_name: str = "pair"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    input: str = MISSING
    output_dir: str = MISSING
    min_margin: float = 0.0
    ties: str = "skip"
    val_fraction: float = 0.1
    seed: int = 0
    paths: Any = MISSING

    def __post_init__(self) -> None:
        refuse((("min_margin", self.min_margin, self.min_margin >= 0, ">= 0"),
                   ("ties", self.ties, self.ties in ("skip", "random"), "skip or random"),
                   ("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)")))  # fmt: skip


@dataclass
class BestOfNConfig:
    """The root of ``dpo-best-of-n``'s config (``conf/best_of_n.yaml``); see :mod:`dpo.commands.best_of_n`."""

    task_name: str = "best_of_n"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    input: str = MISSING
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    output: str = MISSING
    completions: str | None = None
    paths: Any = MISSING

    def __post_init__(self) -> None:
        refuse((("ns", self.ns, bool(self.ns) and all(n >= 1 for n in self.ns),
                    "a non-empty list of whole numbers >= 1"),))  # fmt: skip


@dataclass
class ReportConfig:
    """The root of ``dpo-report``'s config (``conf/report.yaml``); see :mod:`dpo.commands.report_figures`."""

    task_name: str = "report"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    runs: Any = MISSING  # one folder or a list of them
    out: str = "figures"
    title: str = ""
    paths: Any = MISSING


@dataclass
class DashboardConfig:
    """The root of ``dpo-dashboard``'s config (``conf/dashboard.yaml``); see :mod:`dpo.commands.dashboard`."""

    task_name: str = "dashboard"
    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"
    entity: str | None = None
    project: str | None = None
    group: str | None = None
    group_by: str | None = None
    title: str | None = None
    out: str = "dashboard.json"
    spec: str | None = None
    publish: bool = False
    paths: Any = MISSING


PIPELINE = {"sample": SampleConfig, "score": ScoreConfig, "pair": PairConfig, "best_of_n": BestOfNConfig,
            "report": ReportConfig, "dashboard": DashboardConfig}  # fmt: skip
"""The pipeline commands' root schemas (``conf/<name>.yaml``), by config name."""


OUR_GROUPS = ("model", "data", "system", "loss", "optim", "reward", "reference", "paths")
"""Config groups whose schema is ours (the rest configure third-party classes through ``_target_``)."""

SELECTORS = {"system": "kind", "loss": "name", "reward": "name", "reference": "kind"}
"""Groups whose keys depend on the choice, and the key that names the choice."""

def register() -> None:
    """Put every schema into Hydra's ConfigStore, and register the resolvers ``${bundled:NAME}`` (a
    data file shipped in ``dpo/data/files``), ``${run_label:...}`` and ``${run_group_or_sweep:...}``
    (:mod:`dpo.report.naming`). Idempotent; done when this module is imported."""
    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", bundled_path)
        OmegaConf.register_new_resolver("run_label", resolve_run_label)
        OmegaConf.register_new_resolver("run_group_or_sweep", resolve_run_group)
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="optim", node=OptimConfig)
    cs.store(group="schema", name="paths", node=PathsConfig)
    cs.store(group="schema", name="eval", node=EvalConfig)
    for name, node in PIPELINE.items():
        cs.store(group="schema", name=name, node=node)
    cs.store(group="schema", name="template", node=Template)
    for kind, cls in JUDGES.items():
        cs.store(group="schema/judge", name=kind, node=cls.Config)
    for kind, cls in REFERENCES.items():
        cs.store(group="schema/reference", name=kind, node=cls.Config)
    for kind, spec in SYSTEMS.items():
        cs.store(group="schema/system", name=kind, node=spec.config)
    for name in [*LOSSES, MIXTURE]:
        cs.store(group="schema/loss", name=name, node=loss_schema(name))
    for name in REWARDS:
        cs.store(group="schema/reward", name=name, node=reward_schema(name))


register()
