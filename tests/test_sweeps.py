"""Sweeps and launchers: every sweep config composes and its first job builds; submitit and Optuna run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import FAST, compose_config, shrink, with_tiny
from dpo.commands.cli import CONF_DIR
from dpo.commands.train import begin, build

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
TINY_CLI = [
    "experiment=tiny", "debug=fast", "model.architecture.n_layer=1", "model.architecture.n_embd=32",
    "model.architecture.n_head=2", "model.tokenizer.bpe_vocab_size=300", "data.max_length=64",
    "data.max_prompt_length=32", "data.source.max_rows=64",
]  # fmt: skip


def compose_hydra(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=with_tiny(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_and_its_first_job_builds(tmp_path, name):
    cfg = compose_hydra([f"sweep={name}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.run_group == f"sweep_{name}"
    params = dict(cfg.hydra.sweeper.params)
    assert len(params) == 1
    key, values = next(iter(params.items()))
    values = [v.strip() for v in str(values).split(",")]
    assert len(values) >= 2
    if key == "trainer":  # GPU strategies: build each; their CPU twins run in tests/test_scale.py
        for value in values:
            trainer_cfg = compose_config([f"trainer={value}"], tmp_path).trainer
            assert trainer_cfg.devices > 1
            if "strategy" in trainer_cfg and not isinstance(trainer_cfg.strategy, str):
                instantiate(trainer_cfg.strategy)
        return
    job = shrink(compose_config([*FAST, f"sweep={name}", f"{key}={values[0]}"], tmp_path))
    assert job.logger.csv is not None and OmegaConf.select(job, key) is not None
    run = build(job, begin(job))
    assert run.trainer.max_steps == 3 and run.module.loss_name == job.loss.name


def test_slurm_launcher_config_composes_with_the_trainer_shape():
    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 8


def test_optuna_search_composes():
    cfg = compose_hydra(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.storage is None
    assert set(cfg.hydra.sweeper.params) == {"loss.beta", "optim.optimizer.lr"}
    assert cfg.optimized_metric == "val/rewards/accuracy" and cfg.hydra.sweeper.direction == "maximize"


def cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dpo.commands.train", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
def test_submitit_local_multirun_runs_two_jobs(tmp_path):
    cli(
        "-m",
        "hydra/launcher=local",
        "loss.beta=0.1,0.5",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *TINY_CLI,
    )
    for job, beta in (("0", 0.1), ("1", 0.5)):
        header = (tmp_path / job / "csv" / "metrics.csv").read_text().splitlines()[0]
        assert "val/rewards/accuracy" in header
        assert yaml.safe_load((tmp_path / job / "config.yaml").read_text())["loss"]["beta"] == beta


@pytest.mark.slow
def test_optuna_search_uses_the_returned_metric(tmp_path):
    cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *TINY_CLI,
    )
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 0.0 <= results["best_value"] <= 1.0 and set(results["best_params"]) == {"loss.beta", "optim.optimizer.lr"}
