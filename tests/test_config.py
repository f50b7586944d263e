"""Configs: every experiment, loss and data config composes, validates and builds (no training);
a wrong key or type in any group fails by name before anything loads; the demo's tuning never leaks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import dpo.commands.train
import dpo.systems.assemble
from conftest import FAST, FIXTURES, compose_config, shrink
from dpo.commands.cli import CONF_DIR
from dpo.commands.train import begin, build, train
from dpo.config.settings import ConfigError
from dpo.config.validate import plan_batch, validate
from dpo.data.formats import get_format
from dpo.data.sources import DataError, bundled_path
from dpo.systems import SYSTEMS
from dpo.systems.reference import NoReference

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LOSS_CONFIGS = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
BUNDLED_SPLITS = [
    f"data.source.splits.train={bundled_path('reviews_train.jsonl')}",
    f"data.source.splits.val={bundled_path('reviews_val.jsonl')}",
]


def build_and_step(cfg):
    """Build the job and run one training step's maths on its first batch (no Trainer.fit); for
    PPO, one rollout of its first 4 prompts (sample, score, advantages)."""
    run = build(cfg, begin(cfg))
    batch = next(iter(run.datamodule.train_dataloader()))
    if cfg.system.kind == "ppo":
        rollout, tokens = run.module.rollout(batch["prompt_ids"][:4])
        assert tokens > 0 and torch.isfinite(rollout.advantages).all() and torch.isfinite(rollout.scores).all()
        return run, {}
    if cfg.system.kind in ("grpo", "rloo"):  # one iteration's samples, scores and group advantages
        s = run.module.rollout(batch["prompt_ids"][:4], batch["rows"][:4])
        assert torch.isfinite(s.advantages).all() and torch.isfinite(s.ref_logps).all()
        return run, {}
    if cfg.system.kind == "online_dpo":  # sample, label and pair its first prompts (up to 4)
        prompts, rows = batch["prompt_ids"][:4], batch["rows"][:4]
        samples = run.module.sample(prompts, rows)
        scores = run.module.label(prompts, samples, rows)
        assert len(samples) == len(scores) == len(prompts) > 0
        assert all(len(s) == cfg.system.samples_per_prompt for s in scores)
        return run, {"pairs": len(run.module.pairs_of(prompts, samples, scores, rows))}
    loss, metrics = run.module.shared_step(batch, "train")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    return run, metrics


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_validates_and_builds(tmp_path, exported_tiny, exported_tiny_rm, name):
    cfg = shrink(compose_config([*FAST, f"experiment={name}"], tmp_path), exported_tiny)
    if "minibatch_size" in cfg.system:  # PPO, GRPO, RLOO: debug=fast's batch of 2 prompts, minibatches dividing it
        cfg.system.minibatch_size = cfg.data.micro_batch_size
        if cfg.system.reward is not None:  # PPO against a learned reward model
            cfg.system.reward.path = exported_tiny_rm
    if SYSTEMS[cfg.system.kind].manual_steps:  # whole iterations (3 steps would stop inside one)
        cfg.trainer.max_steps = SYSTEMS[cfg.system.kind].steps_per_batch(cfg)
    run, metrics = build_and_step(cfg)
    assert run.start.plan.accumulate_grad_batches >= 1 and (tmp_path / "config.yaml").is_file()
    if cfg.system.kind == "dpo":
        assert ("train/rewards/accuracy" in metrics) == run.module.loss.needs_pairs
    elif cfg.system.kind == "reward_model":
        assert "train/rm/accuracy" in metrics


LOSS_OVERRIDES = {"mix": ["loss.terms=[dpo,sft_token_mean]", "loss.weights=[1.0,0.5]"]}  # its terms are required


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_every_loss_config_builds_and_starts_at_the_reference(tmp_path, monkeypatch, name):
    """At step 0 policy == reference: every implicit reward is 0 and DPO's loss is ln 2. A loss that
    needs no reference never builds or runs one."""
    from dpo.systems.dpo import run_loss

    overrides = [f"loss={name}", *LOSS_OVERRIDES.get(name, [])]
    if not run_loss(compose_config(overrides, tmp_path)).needs_reference:

        def no_copy(*args, **kwargs):
            raise AssertionError("a reference model was built for a reference-free loss")

        monkeypatch.setattr(dpo.systems.reference.FrozenCopy, "of", no_copy)
    run, metrics = build_and_step(compose_config([*FAST, *overrides], tmp_path))
    if run.module.loss.needs_reference:
        assert metrics["train/rewards/margin"] == 0 and metrics["train/kl/chosen"] == 0
    else:
        assert isinstance(run.module.reference, NoReference) and "train/kl/chosen" not in metrics
    if name in ("dpo", "sigmoid", "cdpo", "robust_dpo", "robust"):
        assert metrics["train/loss"].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights load: config and data errors must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the error was found")

    monkeypatch.setattr(dpo.systems.assemble, "load_policy", fail)


# A wrong key and a wrong type in each of our groups, a wrong key in each third-party group, and the
# cross-field checks. Keys Hydra types fail when it composes; `+key=` additions and cross-field
# mistakes fail in dpo.config.validate.validate. All before any data or weights load.
COMPOSE_ERRORS = [
    (["model.dtyp=float32"], r"Key 'dtyp' not in 'ModelConfig'"),
    (["model.dtype=fp16"], r"Invalid value 'fp16', expected one of \[float32, bfloat16, float16\]"),
    (["model.gradient_checkpointing=maybe"], r"gradient_checkpointing"),
    (["data.batchsize=8"], r"Key 'batchsize' not in 'DataConfig'"),
    (["data.batch_size=abc"], r"full_key: data.batch_size"),
    (["data.layout=packed"], r"Invalid value 'packed', expected one of \[auto, separate, shared_prefix"),
    (["data.source.max_rows=many"], r"full_key: data.source.max_rows"),
    (["loss.betta=0.1"], r"Key 'betta' not in 'LossConfig_dpo'"),
    (["loss.beta=abc"], r"full_key: loss.beta"),
    (["optim.decay=exp"], r"Invalid value 'exp', expected one of \[constant, linear, cosine\]"),
    (["optim.warmup_steps=1.5"], r"full_key: optim.warmup_steps"),
    (["reference.rank=4"], r"Key 'rank' not in 'CopyConfig'"),
    (["reference=lora", "reference.r=big"], r"full_key: reference.r"),
    (["reward=tfidf", "reward.seed=abc"], r"full_key: reward.seed"),
    (["reward.output=prob"], r"Key 'output' not in 'RewardConfig_vader'"),
    (["paths.cachedir=/tmp"], r"Key 'cachedir' not in 'PathsConfig'"),
    (["seed=abc"], r"full_key: seed"),
    (["trainer.max_stepz=3"], r"max_stepz"),
]


@pytest.mark.parametrize(("overrides", "pattern"), COMPOSE_ERRORS)
def test_a_wrong_key_or_type_fails_when_hydra_composes(overrides, pattern):
    import re

    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides, Path("unused"))
    message = f"{info.value} {info.value.__cause__}"  # Hydra's message and the OmegaConf error under it
    assert re.search(pattern, message), message


VALIDATE_ERRORS = [
    (["+model.flash=true"], r"unknown key\(s\) \['model.flash'\]"),
    (["+model.tokenizer.size=3"], r"unknown key\(s\) \['model.tokenizer.size'\]"),
    (["+data.batchsize=8"], r"unknown key\(s\) \['data.batchsize'\]"),
    (["+data.source.split=train"], r"unknown key\(s\) \['data.source.split'\]"),
    (["+loss.betta=0.1"], r"unknown key\(s\) \['loss.betta'\]"),
    (["+optim.momentum=0.9"], r"unknown key\(s\) \['optim.momentum'\]"),
    (["+optim.optimizer.lrr=0.1"], r"\['optim.optimizer.lrr'\] for torch.optim.AdamW"),
    (["+reference.rank=4"], r"unknown key\(s\) \['reference.rank'\]"),
    (["+reward.model=x"], r"unknown key\(s\) \['reward.model'\]"),
    (["+paths.tmp=x"], r"unknown key\(s\) \['paths.tmp'\]"),
    (["+foo=1"], r"unknown key\(s\) \['foo'\]"),
    (["+trainer.max_stepz=3"], r"\['trainer.max_stepz'\] for lightning.pytorch.Trainer"),
    (["+callbacks.model_checkpoint.every_n_train_step=3"], r"\['callbacks.model_checkpoint.every_n_train_step'\]"),
    (["+callbacks.samples.prompts=3"], r"\['callbacks.samples.prompts'\] for dpo.evaluation.generations"),
    (["logger=default", "+logger.wandb.projcet=x"], r"\['logger.wandb.projcet'\] for lightning.pytorch.loggers"),
    (["+logger.csv.flush=1"], r"\['logger.csv.flush'\] for dpo.report.csv_logger.ResumableCSVLogger"),
    (["loss.name=ipo_sum"], r"loss.name=ipo_sum but the loss config was composed for 'dpo': choose it with loss="),
    (["reference.kind=lora"], r"reference.kind=lora but the reference config was composed for 'copy'"),
    (["data.batch_size=30"], r"data.batch_size=30 must be a positive multiple of data.micro_batch_size=16"),
    (["data.max_prompt_length=128"], r"max_prompt_length \(128\) < data.max_length \(128\)"),
    (["data.max_length=300", "data.max_prompt_length=64"], r"data.max_length=300 exceeds the model's 256 positions"),
    (["reference=none"], r"needs a reference model but reference=none"),
    (["reference.sync_every=10", "reference.sync_alpha=1.5"], r"reference.sync_alpha=1.5 must be in \(0, 1\]"),
    (["loss.beta=-1"], r"loss.beta must be > 0"),
    (["data=local"], r"not set: \['data.source.splits.train', 'data.source.splits.val'\]"),
    (["+data.source.options.prefix=3"], r"options \['prefix'\] unknown for format 'fields'"),
    (["data=imdb"], r"needs preference pairs but data format 'imdb' gives none"),
    (["data.source.format=reddit"], r"'reddit' is not a known format"),
    (["model=hf"], r"not set: \['model.pretrained'\]"),
    (["trainer.devices=3"], r"world size 3"),
    (["trainer=fsdp_cpu", "data.layout=padding_free"], r"padding_free is untested under FSDP2"),
    (["+trainer.accumulate_grad_batches=2"], r"accumulate_grad_batches is derived from data.batch_size"),
]


@pytest.mark.parametrize(("overrides", "pattern"), VALIDATE_ERRORS)
def test_config_errors_name_the_key_before_weights_load(tmp_path, no_weights, overrides, pattern):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        train(cfg)


def test_bad_data_fails_before_weights_load(tmp_path, no_weights):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": ""}\n')
    cfg = compose_config(
        [
            "data=local",
            f"data.source.splits.train={bad}",
            f"data.source.splits.val={bad}",
            "data.max_length=128",
            "data.max_prompt_length=64",
            "model.tokenizer.bpe_vocab_size=300",
        ],
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'chosen' is empty"):
        train(cfg)


def test_training_split_smaller_than_a_global_batch_fails_before_weights_load(tmp_path, no_weights):
    cfg = compose_config(["data.source.max_rows=20", "model.tokenizer.bpe_vocab_size=300"], tmp_path)
    with pytest.raises(DataError, match=r"training split has 20 usable pairs, fewer than one global batch"):
        train(cfg)


def test_unreachable_reward_classifier_fails_before_weights_load(tmp_path, exported_tiny, no_weights):
    """experiment=imdb_dpo scores with siebert/sentiment-roberta-large-english: offline and not
    cached, the error names the key to set, and no policy weights were loaded first."""
    from dpo.models.load import ModelLoadError

    cfg = shrink(compose_config([*FAST, "experiment=imdb_dpo"], tmp_path), exported_tiny)
    cfg.reward = compose_config(["reward=hf_classifier", "reward.device=cpu"], tmp_path).reward
    with pytest.raises(ModelLoadError, match="set reward.pretrained to a local directory"):
        train(cfg)


def test_plan_batch():
    plan = plan_batch(64, 4, 2, 2)
    assert (plan.world_size, plan.micro_batch_size, plan.accumulate_grad_batches) == (4, 4, 4)
    with pytest.raises(ConfigError, match="positive integer"):
        plan_batch(64, 4, "auto", 1)


def test_layout_is_decided_by_validate_from_model_and_strategy(tmp_path, tiny_model):
    """`auto` becomes padding-free, separate under FSDP2; the datamodule gets it decided."""
    config, cls = tiny_model.config, type(tiny_model)
    assert validate(compose_config([], tmp_path), config, cls).layout == "padding_free"
    assert validate(compose_config(["trainer=fsdp_cpu"], tmp_path), config, cls).layout == "separate"
    assert validate(compose_config(["data.layout=shared_prefix"], tmp_path), config, cls).layout == "shared_prefix"
    assert validate(compose_config(["loss=sft"], tmp_path), config, cls).layout == "separate"
    assert validate(compose_config([], tmp_path)).layout == "auto"  # without the model: undecided


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_builds_on_its_fixture(tmp_path, exported_tiny, name):
    """`dpo-train data=<name>` with the source pointed at a local copy in the hub schema."""
    extra = {
        "local": BUNDLED_SPLITS,
        "local_unpaired": ["system=kto", *(f"data.source.splits.{split}={FIXTURES / 'unpaired' / 'train.jsonl'}"
                                           for split in ("train", "val"))],
        "imdb_pairs": BUNDLED_SPLITS,
        "hf": [f"data.source.path={FIXTURES / 'tldr_flat'}"],
        # chat needs a pretrained tokenizer; the fixture holds one deliberately bad row
        "ultrafeedback": ["model=hf", f"model.pretrained={exported_tiny}", "data.on_bad_row=skip"],
    }.get(name, [])
    cfg = compose_config([*FAST, f"data={name}", *extra], tmp_path)
    fmt = get_format(cfg.data.source.format)
    if not fmt.has_pairs(cfg.data.source.options) and not fmt.labelled:
        cfg = compose_config([*FAST, f"data={name}", "loss=sft", *extra], tmp_path)
    build_and_step(shrink(cfg, exported_tiny))


def test_every_group_file_names_its_schema():
    """Each YAML of our groups begins its defaults list with its schema, or with a sibling that does
    (rpo -> dpo, smollm2 -> hf, tldr_flat -> tldr, ...); composing one shows the schema's type."""
    import yaml

    from dpo.config.schema import OUR_GROUPS, SELECTORS

    for group in OUR_GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            first = yaml.safe_load(path.read_text())["defaults"][0]
            while isinstance(first, str) and not first.startswith("/"):  # a sibling in the same group
                first = yaml.safe_load((CONF_DIR / group / f"{first}.yaml").read_text())["defaults"][0]
            expected = {f"/schema/{group}@_here_": path.stem} if group in SELECTORS else {"/schema@_here_": group}
            assert first == expected or (isinstance(first, dict) and group in SELECTORS
                                         and list(first) == list(expected)), path  # fmt: skip
    node = compose_config(["loss=rpo"], Path("unused")).loss
    assert OmegaConf.get_type(node).__name__ == "LossConfig_dpo" and node.nll_weight == 1.0


DEMO_TUNING = {"optim.optimizer.lr": 5e-5, "trainer.max_steps": 40, "trainer.limit_val_batches": 2}


def demo_settings(cfg):
    found = {k: OmegaConf.select(cfg, k) for k in DEMO_TUNING if OmegaConf.select(cfg, k) == DEMO_TUNING[k]}
    return found | ({"reward_eval": True} if "reward_eval" in cfg.callbacks else {})


@pytest.mark.parametrize(
    ("overrides", "demo"),
    [
        ([], True),
        (["loss=ipo_sum"], True),
        (["sweep=beta"], True),
        (["model=tiny_gpt2"], False),
        (["data=reviews"], False),
        (["experiment=tiny"], False),
        (["model=hf", "model.pretrained=/some/export", "data=local", *BUNDLED_SPLITS], False),
    ],
)
def test_the_default_runs_tuning_applies_only_to_its_own_model_and_data(overrides, demo):
    """What `dpo-train <overrides> --cfg job` prints (the same composition): the last case is
    `dpo-train model=hf model.pretrained=<export> data=local ...`, with research defaults only."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert (demo_settings(cfg) == {**DEMO_TUNING, "reward_eval": True}) if demo else not demo_settings(cfg)
    assert (cfg.task_name == "default_run") == demo
    if "model=hf" in overrides:  # research defaults
        assert cfg.optim.optimizer.lr == 1e-6 and cfg.trainer.max_steps == -1 and cfg.data.batch_size == 64
        assert "limit_val_batches" not in cfg.trainer


def test_sharding_is_read_from_the_strategy_class():
    from dpo.config.validate import is_sharded

    def trainer(strategy):
        return OmegaConf.create({"strategy": strategy})

    assert not is_sharded(trainer("auto")) and not is_sharded(trainer("ddp"))
    assert is_sharded(trainer("fsdp"))  # Lightning's FSDPStrategy, by its registered name
    assert is_sharded(trainer({"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}))
    assert not is_sharded(trainer({"_target_": "lightning.pytorch.strategies.DDPStrategy"}))


def test_checkpoint_and_model_mistakes_fail_before_weights_load(tmp_path, no_weights):
    """ckpt_path must exist and be a Lightning checkpoint of this model; a local model folder must
    exist and hold a model. Each ends in an error naming the key, before any weights load."""
    from dpo.models.load import ModelLoadError

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"policy.transformer.wte.weight": torch.zeros(3, 3)}, "global_step": 1}, other)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = [
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], ConfigError, "no such checkpoint"),
        ([f"ckpt_path={text}"], ConfigError, "not a readable Lightning checkpoint"),
        ([f"ckpt_path={other}"], ConfigError, r"saved from another model: it lacks 28 of this one's weights"),
        (["model=hf", f"model.pretrained={tmp_path / 'no' / 'such'}"], ModelLoadError, "no such folder"),
        (["model=hf", f"model.pretrained={empty}"], ModelLoadError, r"holds no model \(no config.json\)"),
    ]
    for overrides, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            train(compose_config([*FAST, *overrides], tmp_path / "run"))


def test_a_learning_rate_and_warmup_out_of_range_are_refused_together(tmp_path):
    """The fuzz round: optim.optimizer.lr=-1 was torch's traceback after the model loaded; warmup -5 was accepted."""
    with pytest.raises(ConfigError, match=r"optim.optimizer.lr=-1 must be a number > 0; optim.warmup_steps=-5 must"):
        validate(compose_config([*FAST, "optim.optimizer.lr=-1", "optim.warmup_steps=-5"], tmp_path))


def test_mistakes_in_several_groups_are_reported_together_by_key(tmp_path, no_weights):
    """Issue 24: mistakes came one per run (after lr=-1 was fixed, the next run found beta=-1). Each
    group's own range checks now run before the first is raised, and the message names every key."""
    cfg = compose_config(["optim.optimizer.lr=-1", "loss.beta=-0.5", "data.micro_batch_size=0",
                          "data.max_prompt_length=0"], tmp_path)  # fmt: skip
    with pytest.raises(ConfigError) as error:
        train(cfg)
    for key in ("optim.optimizer.lr=-1", "loss.beta must be > 0", "data.micro_batch_size=0",
                "data.max_prompt_length (0)"):  # fmt: skip
        assert key in str(error.value), str(error.value)


def test_cross_field_mistakes_are_reported_together_by_key(tmp_path, no_weights):
    """Issue 24: after the range checks, the cross-field checks stopped at the first (the reference),
    so a run found the model's positions and the batch plan one fix at a time."""
    cfg = compose_config(["reference=none", "+data.source.options.prefix=3", "+trainer.accumulate_grad_batches=2"],
                         tmp_path)  # fmt: skip
    with pytest.raises(ConfigError) as error:
        train(cfg)
    for part in ("needs a reference model but reference=none", "options ['prefix'] unknown for format 'fields'",
                 "accumulate_grad_batches is derived from data.batch_size"):  # fmt: skip
        assert part in str(error.value), str(error.value)


@pytest.mark.parametrize("experiment", ["tldr_sft", "tldr_dpo", "hh_sft", "hh_dpo"])
def test_the_paper_configs_validate_as_the_official_repository_every_20000_examples_on_256(tmp_path, experiment):
    """eval_every 20,000 and n_eval_examples 256 (the official config): Lightning counts
    val_check_interval and limit_val_batches in each process's micro-batches, so both times the
    examples per forward across processes give the official numbers."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    per_forward = cfg.data.micro_batch_size * cfg.trainer.get("devices", 1)
    assert cfg.trainer.check_val_every_n_epoch is None
    assert cfg.trainer.val_check_interval * per_forward == 20_000
    assert cfg.trainer.limit_val_batches * per_forward == 256
