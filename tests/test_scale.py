"""Scale-out invariance: DDP on two CPU processes and gradient accumulation train exactly like one
process on the same global batch; a resumed run continues the uninterrupted trajectory."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A tiny model and a short run, logged every step to CSV.
TINY = [
    "experiment=tiny", "model.architecture.n_layer=1", "model.architecture.n_embd=32", "model.architecture.n_head=2",
    "model.tokenizer.bpe_vocab_size=300", "data.max_length=64", "data.max_prompt_length=32",
    "data.batch_size=8", "data.micro_batch_size=8", "data.eval_batch_size=16", "data.source.max_rows=97", "logger=csv",
    "trainer.log_every_n_steps=1", "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=null",
    "callbacks.samples.every_n_steps=3", "callbacks.samples.n_prompts=3", "callbacks.samples.max_new_tokens=8",
]  # fmt: skip


def run_cli(out: Path, *overrides: str, env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Run `dpo-train` in a subprocess (DDP re-launches it), return metric -> per-row values.

    The held-out split has 97 pairs: 2 ranks get 48 and 49, 3 and 4 batches of 16, so the first
    rank runs a stand-in batch; every rank's validation batch count is written to ``<out>/counts``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", DPO_CACHE_DIR=str(out.parent / "cache"),
               PYTHONPATH=str(Path(__file__).parent), **(env or {}))  # fmt: skip
    overrides = (*overrides, "+callbacks.count._target_=tests_helpers.CountValBatches",
                 f"+callbacks.count.out={out / 'counts'}")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "dpo.commands.train", f"hydra.run.dir={out}", *TINY, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def assert_same_trajectory(a, b, tol=1e-5):
    assert len(a["train/loss"]) == 6 and a["train/loss"][0] == pytest.approx(0.6931472, abs=1e-6)
    for key in ("train/loss", "train/rewards/margin", "train/rewards/accuracy", "val/loss", "val/rewards/margin"):
        assert a[key] == pytest.approx(b[key], abs=tol, rel=tol), key


# Checkpoints every 3 steps, each kept (step000003.ckpt, step000006.ckpt): the resume tests start
# from the reference runs' step-3 checkpoints. Checkpoints change no number.
EVERY3 = ("callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, micro-batch 8, checkpoints every 3 steps: the trajectory the others must equal."""
    out = tmp_path_factory.mktemp("single") / "run"
    return out, run_cli(out, "data.micro_batch_size=8", *EVERY3)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """FSDP2 on 2 CPU processes (micro-batch 4 each), checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, run_cli(out, "trainer=fsdp_cpu", "data.micro_batch_size=4", *EVERY3)


@pytest.mark.slow
def test_ddp_and_accumulation_equal_one_process(tmp_path, single):
    """4 x 2 accumulation and 2 DDP ranks x 4 equal one process at micro-batch 8. Both run with
    precomputed reference log-probs (each its own cache): one process's pass and the DDP predict
    pass (each rank its share, gathered) give the same cache, and the live reference's trajectory."""
    import torch

    pre = "reference=precomputed"
    accumulated = run_cli(tmp_path / "one" / "accum", "data.micro_batch_size=2", pre)  # 4 micro-batches x 2
    ddp = run_cli(tmp_path / "two" / "ddp", "trainer=ddp_cpu", "data.micro_batch_size=4", pre)  # 2 ranks x 4
    assert_same_trajectory(accumulated, single[1])
    assert_same_trajectory(ddp, single[1])  # validation means included: stand-in batches count zero
    assert_samples(tmp_path / "two" / "ddp")
    assert_equal_validation_batches(tmp_path / "two" / "ddp")
    caches = [sorted((tmp_path / name / "cache" / "tokenized").glob("ref-*.pt")) for name in ("one", "two")]
    assert len(caches[0]) == 2 and [p.name for p in caches[0]] == [p.name for p in caches[1]]  # train, val
    for one, two in zip(*caches, strict=True):
        a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
        assert a.shape == b.shape and torch.isfinite(a).all() and (a - b).abs().max() <= 1e-6


def assert_equal_validation_batches(out: Path) -> None:
    counts = [int((out / "counts" / f"val_batches_rank{r}.txt").read_text()) for r in (0, 1)]
    assert counts[0] == counts[1] > 0, counts


def assert_samples(out: Path) -> None:
    """Sampling ran under the strategy without hanging: all prompts, every 3 steps, from all ranks."""
    import json

    for step in (3, 6):
        rows = [json.loads(line) for line in (out / "samples" / f"step{step:06d}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2] and all(r["step"] == step for r in rows)


@pytest.mark.slow
def test_fsdp2_equals_one_process_and_exports_full_weights(single, fsdp):
    from transformers import AutoModelForCausalLM

    assert_same_trajectory(fsdp[1], single[1])
    assert_samples(fsdp[0])
    assert_equal_validation_batches(fsdp[0])
    assert (fsdp[0] / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # a distributed checkpoint
    gathered = AutoModelForCausalLM.from_pretrained(fsdp[0] / "hf").state_dict()
    plain = AutoModelForCausalLM.from_pretrained(single[0] / "hf").state_dict()
    for name, value in plain.items():
        assert value.shape == gathered[name].shape and (value - gathered[name]).abs().max() < 1e-5, name


@pytest.mark.slow
def test_resume_mid_epoch_continues_the_same_trajectory(tmp_path, single):
    """Resume from the one-process run's step-3 checkpoint (mid-epoch): steps 4-6 match the full run."""
    resumed = run_cli(tmp_path / "resumed", *EVERY3, f"ckpt_path={single[0] / 'checkpoints' / 'step000003.ckpt'}")
    assert resumed["train/loss"] == pytest.approx(single[1]["train/loss"][3:], abs=1e-6)
    assert resumed["val/loss"][-1] == pytest.approx(single[1]["val/loss"][-1], abs=1e-6)


@pytest.mark.slow
def test_fsdp2_through_the_head_in_tiles_equals_one_process(tmp_path, single):
    """Tiles of 1000 logits (a few tokens of the tiny vocabulary) under FSDP2: the root's forward
    keeps no logits, the tiles use the head it gathered, FSDP2 reduce-scatters its gradient."""
    out = tmp_path / "run"
    tiled = run_cli(out, "trainer=fsdp_cpu", "data.micro_batch_size=4", *EVERY3, env={"DPO_TILE_ELEMENTS": "1000"})
    assert any("through the LM head in tiles" in f.read_text() for f in out.glob("*.log"))
    assert_same_trajectory(tiled, single[1])


def test_resume_from_a_sharded_fsdp_checkpoint(tmp_path, fsdp):
    """Resume from the FSDP2 run's step-3 distributed checkpoint (a folder) under FSDP2."""
    ckpt = fsdp[0] / "checkpoints" / "step000003.ckpt"
    assert (ckpt / "meta.pt").is_file()
    resumed = run_cli(tmp_path / "resumed", "trainer=fsdp_cpu", "data.micro_batch_size=4", *EVERY3, f"ckpt_path={ckpt}")
    assert resumed["train/loss"] == pytest.approx(fsdp[1]["train/loss"][3:], abs=1e-6)
