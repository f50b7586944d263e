"""Configs: every experiment and loss composes and runs; bad configs fail by key before weights load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

import dpo.train
from conftest import FAST, FIXTURES, compose_config, shrink
from dpo.config import ConfigError, plan_batch, validate
from dpo.data.formats import get_format
from dpo.data.sources import DataError, bundled_path
from dpo.train import CONF_DIR, train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LOSS_CONFIGS = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))


def run_fast(tmp_path, overrides, exported_tiny=None):
    cfg = shrink(compose_config([*FAST, "trainer.max_steps=1", *overrides], tmp_path), exported_tiny)
    return cfg, train(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_runs_one_step(tmp_path, exported_tiny, name):
    cfg, metrics = run_fast(tmp_path, [f"experiment={name}"], exported_tiny)
    assert math.isfinite(metrics["val/loss"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_every_loss_config_runs_one_step(tmp_path, name):
    cfg, metrics = run_fast(tmp_path, [f"loss={name}"])
    assert math.isfinite(metrics["val/loss"])
    if name != "sft":
        assert "val/rewards/accuracy" in metrics


def test_reference_free_losses_never_build_a_reference(tmp_path, monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("a reference model was built for a reference-free loss")

    monkeypatch.setattr(dpo.train, "make_reference", no_copy)
    for loss in ("simpo", "ref_free_dpo", "sft"):
        _, metrics = run_fast(tmp_path / loss, [f"loss={loss}"])
        assert "val/kl/chosen" not in metrics  # no reference ran either


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights load: config and data errors must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the error was found")

    monkeypatch.setattr(dpo.train, "load_policy", fail)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["+loss.betta=0.1"], r"has no parameter\(s\) \['betta'\]"),
        (["+data.batchsize=8"], r"unknown key\(s\) \['data.batchsize'\]"),
        (["data.batch_size=30"], r"data.batch_size=30 must be a positive multiple of data.micro_batch_size=16"),
        (["data.max_prompt_length=128"], r"max_prompt_length \(128\) < data.max_length \(128\)"),
        (["reference=none"], r"needs a reference model but reference=none"),
        (["+reference.rank=4"], r"unknown key\(s\) \['reference.rank'\] for reference.kind=copy"),
        (["reference.sync_every=10", "reference.sync_alpha=1.5"], r"sync_alpha must be in \(0, 1\]"),
        (["data=local"], r"not set: \['data.source.splits.train', 'data.source.splits.val'\]"),
        (["+data.source.options.prefix=3"], r"options \['prefix'\] unknown for format 'fields'"),
        (["data=imdb"], r"needs preference pairs but data format 'imdb' gives none"),
        (["data.source.format=reddit"], r"'reddit' is not a known format"),
        (["data.on_bad_row=ignore"], r"on_bad_row must be error or skip"),
        (["model=hf"], r"not set: \['model.pretrained'\]"),
        (["loss.name=dpoo"], r"'dpoo' is not a registered loss"),
        (["trainer.devices=3"], r"world size 3"),
        (["~data.shuffle"], r"missing key\(s\) \['data.shuffle'\]"),
    ],
)
def test_config_errors_name_the_key_before_weights_load(tmp_path, no_weights, overrides, pattern):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        train(cfg)


def test_override_typo_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="betta"):
        compose_config(["loss.betta=0.1"], Path("unused"))


def test_bad_data_fails_before_weights_load(tmp_path, no_weights):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": ""}\n')
    cfg = compose_config(
        [
            "data=local",
            f"data.source.splits.train={bad}",
            f"data.source.splits.val={bad}",
            "model.tokenizer.bpe_vocab_size=300",
        ],
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'chosen' is empty"):
        train(cfg)


def test_training_split_smaller_than_a_global_batch_fails_before_weights_load(tmp_path, no_weights):
    cfg = compose_config(["data.source.max_rows=20", "model.tokenizer.bpe_vocab_size=300"], tmp_path)
    with pytest.raises(ConfigError, match=r"training split has 20 usable pairs, fewer than one global batch"):
        train(cfg)


def test_layout_auto_shares_the_prompt_except_under_fsdp(tmp_path):
    from dpo.config import resolve_layout

    assert resolve_layout(compose_config([], tmp_path)) == "padding_free"
    assert resolve_layout(compose_config(["trainer=fsdp_cpu"], tmp_path)) == "separate"
    assert resolve_layout(compose_config(["data.layout=separate"], tmp_path)) == "separate"
    with pytest.raises(ConfigError, match="untested under FSDP2"):
        validate(compose_config(["trainer=fsdp_cpu", "data.layout=shared_prefix"], tmp_path))


def test_plan_batch():
    plan = plan_batch(64, 4, 2, 2)
    assert (plan.world_size, plan.micro_batch_size, plan.accumulate_grad_batches) == (4, 4, 4)
    with pytest.raises(ConfigError, match="positive integer"):
        plan_batch(64, 4, "auto", 1)


DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if not p.stem.startswith("_"))
BUNDLED_SPLITS = [
    f"data.source.splits.train={bundled_path('reviews_train.jsonl')}",
    f"data.source.splits.val={bundled_path('reviews_val.jsonl')}",
]


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_runs_one_step_on_its_fixture(tmp_path, exported_tiny, name):
    """`dpo-train data=<name>` with the source pointed at a local copy in the hub schema."""
    extra = {
        "local": BUNDLED_SPLITS,
        "imdb_pairs": BUNDLED_SPLITS,
        "hf": [f"data.source.path={FIXTURES / 'tldr_flat'}"],
        # chat needs a pretrained tokenizer; the fixture holds one deliberately bad row
        "ultrafeedback": ["model=hf", f"model.pretrained={exported_tiny}", "data.on_bad_row=skip"],
    }.get(name, [])
    cfg = compose_config([*FAST, f"data={name}", "trainer.max_steps=1", *extra], tmp_path)
    if not get_format(cfg.data.source.format).has_pairs(cfg.data.source.options):
        cfg = compose_config([*FAST, f"data={name}", "trainer.max_steps=1", "loss=sft", *extra], tmp_path)
    metrics = train(shrink(cfg, exported_tiny))
    assert math.isfinite(metrics["val/loss"])


def test_unreachable_reward_classifier_fails_before_weights_load(tmp_path, no_weights):
    """experiment=imdb_dpo scores with siebert/sentiment-roberta-large-english: offline and not
    cached, the error names the key to set, and no policy weights were loaded first."""
    from dpo.models import ModelLoadError

    cfg = shrink(compose_config([*FAST, "experiment=imdb_dpo", "trainer.max_steps=1"], tmp_path))
    cfg.reward = {"name": "hf_classifier", "pretrained": "siebert/sentiment-roberta-large-english", "revision": None,
                  "positive_label": "POSITIVE", "output": "logit", "batch_size": 8, "max_length": 64,
                  "device": "cpu", "trust_remote_code": False}  # fmt: skip
    with pytest.raises(ModelLoadError, match="set reward.pretrained to a local directory"):
        train(cfg)
