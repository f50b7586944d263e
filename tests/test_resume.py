"""Runs that survive faults: kill -9 then the same command resumes; a submitit requeue resumes; a
kill mid-checkpoint keeps the previous one; a changed config is refused; a finished run isn't rerun;
run identity cannot lie (a killed extension, an extension max_epochs ends, changed data, the name)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dpo.runtime.checkpoint import LAST, check_fits, checkpoint_tensors, find_last, swap_in

TESTS = Path(__file__).parent
TINY = [
    "experiment=tiny", "model.architecture.n_layer=1", "model.architecture.n_embd=32", "model.architecture.n_head=2",
    "model.tokenizer.bpe_vocab_size=300", "data.max_length=64", "data.max_prompt_length=32", "data.batch_size=8",
    "data.micro_batch_size=8", "data.eval_batch_size=16", "data.source.max_rows=96", "logger=csv",
    "trainer.log_every_n_steps=1", "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.samples.n_prompts=2", "callbacks.samples.max_new_tokens=4",
]  # fmt: skip
SLOW = ["+callbacks.slow._target_=tests_helpers.SlowSteps", "+callbacks.slow.seconds=0.4"]


def env(root: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", DPO_CACHE_DIR=str(root / "cache"), PYTHONPATH=str(TESTS))


def command(root: Path, *overrides: str, multirun: bool = False) -> list[str]:
    mode = ["-m"] if multirun else []
    return [sys.executable, "-m", "dpo.commands.train", *mode, f"paths.log_dir={root}", *TINY, *overrides]


def losses(folder: Path) -> list[tuple[int, float]]:
    rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def wait_for(predicate, timeout: float = 300) -> None:
    start = time.time()
    while not predicate():
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def run(root: Path, *overrides: str) -> str:
    return finish(subprocess.Popen(command(root, *overrides), env=env(root), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    run(root, "run_name=full")
    return losses(root / "tiny" / "runs" / "full")


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_the_same_trajectory(tmp_path, uninterrupted):
    """kill -9 between two checkpoints, the same command again: it resumes from the last checkpoint
    (not step 0), and metrics.csv holds every step once, equal to an uninterrupted run's."""
    folder = tmp_path / "tiny" / "runs" / "named"
    cmd = command(tmp_path, "run_name=named", *SLOW)
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    wait_for(lambda: find_last(folder / "checkpoints") is not None)  # step 3 saved
    time.sleep(0.6)  # into step 4 or 5, past the checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step, _ = checkpoint_tensors(folder / "checkpoints" / LAST)
    assert step >= 3  # the killed run got past its first checkpoint; the rerun starts there, not at 0
    out = run(tmp_path, "run_name=named", *SLOW)  # the same command
    assert f"resuming from {folder / 'checkpoints' / LAST}" in out
    resumed = losses(folder)
    assert [s for s, _ in resumed] == list(range(10))  # every step once
    assert [v for _, v in resumed] == pytest.approx([v for _, v in uninterrupted], abs=1e-6)


def test_a_finished_run_is_not_retrained_and_a_longer_one_continues(tmp_path, caplog):
    """In one process: the same config again trains nothing; only how long to train may change.

    A run that stopped at max_steps saved its last checkpoint at the epoch's end (Lightning counts
    that epoch as done), so a longer run continues with the next epoch."""
    from conftest import compose_config
    from dpo.commands.train import train
    from dpo.config.settings import ConfigError

    def config(*extra):
        return compose_config(["logger=csv", "data.source.max_rows=64", "data.batch_size=16", "trainer.max_epochs=2",
                               "data.micro_batch_size=16", "trainer.log_every_n_steps=1",
                               "model.architecture.n_layer=1", "model.architecture.n_embd=32",
                               "model.architecture.n_head=2", "model.tokenizer.bpe_vocab_size=300", *extra],
                              tmp_path)  # fmt: skip

    first = train(config("trainer.max_steps=2"))
    with caplog.at_level("INFO"):
        assert train(config("trainer.max_steps=2")) == first  # the stored result, nothing trained
    assert "holds a finished run" in caplog.text
    with pytest.raises(ConfigError, match=r"different config \(loss.beta: 0.1 -> 0.2\)"):
        train(config("trainer.max_steps=2", "loss.beta=0.2"))
    caplog.clear()
    with caplog.at_level("INFO"):
        train(config("trainer.max_steps=4"))
    assert "resuming from" in caplog.text and [s for s, _ in losses(tmp_path)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_submitit_requeue_resumes_in_the_same_folder(tmp_path, uninterrupted):
    """A sweep job through submitit's local executor gets the preemption signal: the checkpoint is
    saved at the end of the step, submitit requeues the job, it reruns in its folder and resumes."""
    import psutil

    cmd = command(tmp_path, "hydra/launcher=local", "run_name=sweep", *SLOW, multirun=True)
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / "tiny" / "multiruns" / "sweep" / "0"

    def job() -> psutil.Process | None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        return next((p for p in kids if "submitit.core._submit" in " ".join(p.cmdline())), None)

    wait_for(lambda: (folder / "csv").is_dir() and job() is not None)
    time.sleep(1.5)  # a few steps in
    job().send_signal(signal.SIGUSR2)  # what SLURM sends before a time limit or on preemption
    finish(proc)
    logs = "".join(p.read_text() for p in (tmp_path / "tiny" / "multiruns" / "sweep").rglob("*.err"))
    logs += "".join(p.read_text() for p in (tmp_path / "tiny" / "multiruns" / "sweep").rglob("*.out"))
    logs += "".join(p.read_text() for p in folder.glob("*.log"))
    assert "preemption: saving" in logs and "Requeued job" in logs and "resuming from" in logs
    resumed = losses(folder)
    assert [s for s, _ in resumed] == list(range(10))
    assert [v for _, v in resumed] == pytest.approx([v for _, v in uninterrupted], abs=1e-6)


KILL_MID_WRITE = """
import os, sys
import lightning.pytorch as pl
from lightning.pytorch.plugins.io import TorchCheckpointIO
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import TINY_ARCH
from tests_helpers import tiny_datamodule
from dpo.runtime.checkpoint import AtomicCheckpoint
from dpo.models.load import ModelConfig, load_policy, train_bpe_tokenizer
from dpo.systems.reference import FrozenCopy
from dpo.systems.base import OptimConfig
from dpo.systems.dpo import DPOModule
from dpo.data.formats import load_rows
from conftest import bundled_spec

class DiesMidWrite(TorchCheckpointIO):
    saves = 0
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        DiesMidWrite.saves += 1
        if DiesMidWrite.saves == 2:  # the second save: half a file, then the process is gone
            with open(path, "wb") as f:
                f.write(b"PK" + os.urandom(1000))
            os._exit(9)
        super().save_checkpoint(checkpoint, path, storage_options)

rows = load_rows(bundled_spec(), "train")[0][:300]
tok = train_bpe_tokenizer([t for r in rows for t in (r.prompt, r.chosen, r.rejected)], 300)
policy = load_policy(ModelConfig(None, architecture=TINY_ARCH), tokenizer=tok)
optim = OptimConfig({{"_target_": "torch.optim.AdamW"}})
module = DPOModule(policy, FrozenCopy.of(policy), "dpo", {{"beta": 0.1}}, optim)
ckpt = AtomicCheckpoint(dirpath={dirpath!r}, save_last=True, save_top_k=0, every_n_train_steps=1,
                        enable_version_counter=False)
trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, limit_val_batches=0,
                     callbacks=[ckpt], plugins=[DiesMidWrite()], enable_model_summary=False)
trainer.fit(module, datamodule=tiny_datamodule(tok))
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    from conftest import TINY_ARCH
    from dpo.models.load import ModelConfig, load_config, parameter_shapes

    script = KILL_MID_WRITE.format(tests=str(TESTS), dirpath=str(tmp_path / "checkpoints"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(tmp_path))
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / f".{LAST}.tmp").is_file()  # the torn write, under its temporary name
    last = find_last(tmp_path / "checkpoints")
    assert last == tmp_path / "checkpoints" / LAST
    config = load_config(ModelConfig(None, architecture=TINY_ARCH))
    config.vocab_size = torch.load(last, weights_only=True)["state_dict"]["policy.lm_head.weight"].shape[0]
    assert check_fits(last, parameter_shapes(config)) == 1  # the first save, whole and loadable


def test_a_folder_checkpoint_is_never_missing(tmp_path):
    """FSDP2 writes a folder: swapping it in takes two renames; a crash between them leaves
    last.ckpt.old, which find_last returns, and a finished swap leaves only the new one."""
    last, tmp = tmp_path / LAST, tmp_path / f".{LAST}.tmp"
    for folder, tag in ((last, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "meta.pt").write_text(tag)
    os.replace(last, last.with_name(LAST + ".old"))  # the first rename, then a crash
    assert find_last(tmp_path) == tmp_path / f"{LAST}.old"
    os.replace(last.with_name(LAST + ".old"), last)
    swap_in(tmp, last)
    assert find_last(tmp_path) == last and (last / "meta.pt").read_text() == "new"
    assert not tmp.exists() and not last.with_name(LAST + ".old").exists()


def small_run_config(tmp_path, *extra):
    """A one-layer tiny run in ``tmp_path``: 64 training pairs in batches of 16 (4 steps an epoch)."""
    from conftest import compose_config

    return compose_config(["logger=csv", "data.source.max_rows=64", "data.batch_size=16", "data.micro_batch_size=16",
                           "trainer.log_every_n_steps=1", "model.architecture.n_layer=1",
                           "model.architecture.n_embd=32", "model.architecture.n_head=2",
                           "model.tokenizer.bpe_vocab_size=300", "++trainer.limit_val_batches=1",
                           "callbacks.samples=null", *extra], tmp_path)  # fmt: skip


class CrashAt(pl.Callback):
    """Raises after optimizer step ``step`` (its checkpoint written): a killed job, in one process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


@pytest.mark.slow
def test_a_killed_extension_of_a_finished_run_resumes_instead_of_reading_finished(tmp_path):
    """Issue 23's first defect: a finished run extended with a larger trainer.max_steps, killed, and rerun
    with the same command was reported "finished; nothing to train" (run.json kept status finished)."""
    import json

    from dpo.commands.train import train

    every = "callbacks.model_checkpoint.every_n_train_steps=1"
    train(small_run_config(tmp_path, "trainer.max_steps=2", every))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"
    with pytest.raises(RuntimeError, match="killed"):
        train(small_run_config(tmp_path, "trainer.max_steps=4", every), extra_callbacks=[CrashAt(3)])
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"
    train(small_run_config(tmp_path, "trainer.max_steps=4", every))
    assert [s for s, _ in losses(tmp_path)] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_an_extension_that_max_epochs_already_ended_is_refused_before_weights_load(tmp_path, monkeypatch):
    """An extension by trainer.max_steps alone used to train 0 steps and say nothing (it meets max_epochs)."""
    import dpo.systems.assemble
    from dpo.commands.train import train
    from dpo.config.settings import ConfigError

    train(small_run_config(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=1"))  # 4 steps: the epoch
    monkeypatch.setattr(dpo.systems.assemble, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    message = r"max_steps=6 extends this run past step 4, but trainer.max_epochs=1 \(4 steps each\) already ended it"
    with pytest.raises(ConfigError, match=message):
        train(small_run_config(tmp_path, "trainer.max_steps=6", "trainer.max_epochs=1"))


@pytest.mark.slow
def test_resuming_on_changed_data_is_refused_by_split_and_accepted_with_the_switch(tmp_path, monkeypatch):
    """Resuming after the training file changed used to continue silently on the new data."""
    import json

    import dpo.systems.assemble
    from dpo.commands.train import train
    from dpo.config.settings import ConfigError
    from dpo.data.sources import bundled_path

    data = tmp_path / "train.jsonl"
    lines = Path(bundled_path("reviews_train.jsonl")).read_text().split("\n")[:64]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    over = [f"data.source.splits.train={data}", "trainer.max_epochs=-1"]
    train(small_run_config(out, "trainer.max_steps=2", *over))
    before = json.loads((out / "run.json").read_text())["data"]
    assert set(before) == {"train", "val"} and before["train"].startswith("64 rows, sha256 ")
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows in another order
    load_policy = dpo.systems.assemble.load_policy
    monkeypatch.setattr(dpo.systems.assemble, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=r"the data of this run changed since it began: train \(64 rows, sha256 "):
        train(small_run_config(out, "trainer.max_steps=3", *over))
    monkeypatch.setattr(dpo.systems.assemble, "load_policy", load_policy)
    train(small_run_config(out, "trainer.max_steps=3", *over, "guard.data_changed=accept"))
    state = json.loads((out / "run.json").read_text())
    assert state["data_history"] == [{"step": 2, "data": before}] and state["data"]["train"] != before["train"]
    assert state["data"]["val"] == before["val"] and state["status"] == "finished"


@pytest.mark.parametrize("name", ["", "../../x", "/tmp/elsewhere", "a/../../b"])
def test_a_run_name_outside_the_runs_folder_is_refused(tmp_path, name):
    from omegaconf import open_dict

    from conftest import FAST, compose_config
    from dpo.commands.train import begin
    from dpo.config.settings import ConfigError

    cfg = compose_config(FAST, tmp_path)
    with open_dict(cfg):
        cfg.run_name = name
    with pytest.raises(ConfigError, match=r"run_name=.* must name a folder inside the task's runs folder"):
        begin(cfg)


def save_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], step: int = 3) -> Path:
    torch.save({"state_dict": {k: torch.zeros(v) for k, v in shapes.items()}, "global_step": step}, path)
    return path


@pytest.mark.parametrize(("saved", "message"), [
    ("fewer_layers", r"lacks 12 of this one's weights, e.g. \['transformer.h.1.attn.c_attn.bias'"),
    ("more_layers", r"holds weights this one lacks, e.g. \['transformer.h.2.attn.c_attn.bias'"),
    ("reward_model", r"lacks 1 of this one's weights, e.g. \['lm_head.weight'\]"),
    ("ppo", r"saved by another training system: it holds modules \['value_head.'\] beside the policy"),
    ("wider_vocabulary", r"saved from another model: lm_head.weight is \(96, 32\), here \(64, 32\)"),
])  # fmt: skip
def test_a_checkpoint_of_another_model_or_system_is_refused_by_its_names(tmp_path, saved, message):
    """Issue 23: ckpt_path to another depth, a reward model or PPO passed the shared-shapes check and died
    in load_state_dict after the weights loaded. Now every name is checked, both ways (read without weights)."""
    from transformers import GPT2Config

    from dpo.models.load import parameter_shapes

    def policy(n_layer: int, classifier: bool = False) -> dict[str, tuple[int, ...]]:
        config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, n_positions=32, pad_token_id=0)
        return parameter_shapes(config, classifier=classifier)

    here = policy(2)
    wider = policy(2) | {"transformer.wte.weight": (96, 32), "lm_head.weight": (96, 32)}
    saved_shapes = {"fewer_layers": policy(1), "more_layers": policy(3), "wider_vocabulary": wider,
                    "reward_model": policy(2, classifier=True),
                    "ppo": policy(2) | {"value_head.weight": (1, 32)}}[saved]  # fmt: skip
    entries = {(k if k.startswith("value_head.") else f"policy.{k}"): v for k, v in saved_shapes.items()}
    path = save_checkpoint(tmp_path / "other.ckpt", entries)
    with pytest.raises(ValueError, match=message):
        check_fits(path, here)
    mine = {f"policy.{k}": v for k, v in here.items()}
    assert check_fits(save_checkpoint(tmp_path / "same.ckpt", mine), here) == 3
    ppo = save_checkpoint(tmp_path / "ppo.ckpt", mine | {"value_head.bias": (1,), "reference.x": (1,)})
    assert check_fits(ppo, here, extras=("value_head.",)) == 3
