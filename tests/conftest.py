"""Shared fixtures: offline environment, a tiny tokenizer and model, config composition."""

from __future__ import annotations

import os

# No test may reach a hub: fail in milliseconds instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from dpo.commands.cli import CONF_DIR  # noqa: E402
from dpo.config.signatures import reward_schema  # noqa: E402
from dpo.data.formats import load_rows  # noqa: E402
from dpo.data.sources import SourceSpec, bundled_path  # noqa: E402
from dpo.models.export import export_pretrained  # noqa: E402
from dpo.models.load import ModelConfig, load_policy, train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(1)

TINY_ARCH = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128}


def bundled_spec(max_rows: int | None = None) -> SourceSpec:
    """The bundled reviews as a source; validation doubles as training data in quick tests."""
    path = bundled_path("reviews_val.jsonl")
    return SourceSpec("fields", {"train": bundled_path("reviews_train.jsonl"), "val": path}, None, max_rows=max_rows)


@pytest.fixture(scope="session")
def bundled_rows():
    return load_rows(bundled_spec(), "train")[0]


@pytest.fixture(scope="session")
def bpe_tokenizer(bundled_rows):
    """A byte-level BPE (GPT-2 family) trained on the bundled training texts."""
    texts = [t for r in bundled_rows for t in (r.prompt, r.chosen, r.rejected)]
    return train_bpe_tokenizer(texts, vocab_size=512)


@pytest.fixture
def tiny_model(bpe_tokenizer):
    """A 2-layer GPT-2 with random weights (seeded)."""
    torch.manual_seed(0)
    return load_policy(ModelConfig(None, architecture=TINY_ARCH), tokenizer=bpe_tokenizer)


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory, bpe_tokenizer):
    """A directory holding a tiny model and tokenizer, as a Hugging Face export."""
    torch.manual_seed(0)
    model = load_policy(ModelConfig(None, architecture=TINY_ARCH), tokenizer=bpe_tokenizer)
    return str(export_pretrained(model, bpe_tokenizer, tmp_path_factory.mktemp("tiny") / "hf"))


@pytest.fixture(scope="session")
def exported_tiny_rm(tmp_path_factory, bpe_tokenizer):
    """A directory holding a tiny one-label reward model (random weights) and its tokenizer."""
    from dpo.rewards.learned import load_reward_model

    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(None, architecture=TINY_ARCH), tokenizer=bpe_tokenizer)
    return str(export_pretrained(model, bpe_tokenizer, tmp_path_factory.mktemp("tiny_rm") / "hf"))


def with_tiny(overrides: list[str]) -> list[str]:
    """``overrides`` on the tiny test configuration, unless they pick an experiment themselves."""
    return overrides if any(o.startswith("experiment=") for o in overrides) else ["experiment=tiny", *overrides]


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The composed `dpo-train` config with ``overrides`` (on ``experiment=tiny`` unless they name
    an experiment), writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=with_tiny(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(Path(output_dir) / "cache")
    return cfg


# Tiny, fast settings for running a config in a test: few steps, short rows, CSV logging only.
FAST = [
    "debug=fast",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "data.source.max_rows=64",
    "callbacks.model_checkpoint.every_n_train_steps=null",
]
TINY_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2}
FIXTURES = Path(__file__).parent / "fixtures"
# Local fixtures in each hub data set's schema, keyed by parser format.
FIXTURE_FOR_FORMAT = {
    "hh": "hh", "tldr": "tldr", "tldr_flat": "tldr_flat", "tldr_sft": "tldr_sft", "shp": "shp",
    "imdb": "imdb", "chat": "ultrafeedback", "tldr_articles": "tldr", "cnn_dailymail": "cnn_dailymail",
}  # fmt: skip


def shrink(cfg: DictConfig, exported_tiny: str | None = None) -> DictConfig:
    """Make a composed config runnable here: a tiny model instead of a hub model, the local fixture
    instead of a hub data set, the CPU in fp32."""
    with open_dict(cfg):
        if cfg.model.architecture is not None:
            cfg.model.architecture.update(TINY_MODEL)
            cfg.model.tokenizer.bpe_vocab_size = 300
        pretrained = None if OmegaConf.is_missing(cfg.model, "pretrained") else cfg.model.pretrained
        if pretrained is not None and Path(pretrained).is_dir():
            pass
        elif pretrained is not None or cfg.model.architecture is None:
            cfg.model.pretrained = exported_tiny
            cfg.model.dtype = "float32"
        source = cfg.data.source
        for split in ("train", "val"):  # a required pairs file (experiment=imdb_dpo): the bundled pairs
            if OmegaConf.is_missing(source.splits, split):
                source.splits[split] = bundled_path(f"reviews_{split}.jsonl")
        if source.path is not None and not Path(source.path).is_dir():
            source.path = str(FIXTURES / FIXTURE_FOR_FORMAT[source.format])
            source.name = source.data_dir = None
        evaluation = (cfg.get("callbacks") or {}).get("reward_eval")
        if evaluation is not None and evaluation.get("prompt_source") is not None:  # IMDB's test split: the fixture
            prompts = evaluation.prompt_source
            if prompts.path is not None and not Path(prompts.path).is_dir():
                prompts.path = str(FIXTURES / FIXTURE_FOR_FORMAT[prompts.format])
        if cfg.get("reward") is not None and cfg.reward.name == "hf_classifier":  # the paper's RoBERTa: a hub model
            cfg.reward = OmegaConf.structured(reward_schema("vader"))
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.precision = "32-true"
        if cfg.trainer.get("devices", 1) != 1:  # a multi-GPU config (experiment=tldr_*) as one CPU process
            cfg.trainer.devices = 1
            cfg.trainer.strategy = "auto"
    return cfg
