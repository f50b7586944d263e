"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from dpo.data.batch import Layout
from dpo.data.datamodule import DataConfig, PreferenceDataModule
from dpo.data.sources import SourceSpec, bundled_path


def tiny_data_config(source: SourceSpec, **kwargs) -> DataConfig:
    """A data config for quick tests: global and micro batch 4, lengths 64/32, no cache."""
    settings = {"batch_size": 4, "micro_batch_size": 4, "eval_batch_size": 8, "max_length": 64,
                "max_prompt_length": 32, "cache_dir": None} | kwargs  # fmt: skip
    return DataConfig(source=source, **settings)


def tiny_datamodule(
    tokenizer, pairs: bool = True, max_rows: int | None = None, layout: Layout = Layout.separate
) -> PreferenceDataModule:
    """The bundled validation pairs as both splits, micro-batch 4, lengths 64/32, no cache."""
    path = bundled_path("reviews_val.jsonl")
    source = SourceSpec("fields", {"train": path, "val": path}, None, max_rows=max_rows)
    return PreferenceDataModule(tokenizer, tiny_data_config(source), pairs=pairs, layout=layout)


class SlowSteps(pl.Callback):
    """Sleeps after every training batch, so a test can kill a run between two checkpoints."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        import time

        time.sleep(self.seconds)


class PoisonGradient(pl.Callback):
    """Puts a NaN into one gradient of optimizer step ``step`` (1-based): the non-finite guard's test."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in pl_module.policy.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class CountValBatches(pl.Callback):
    """Writes how many validation batches each rank ran, to ``<out>/val_batches_rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out, self.count = out, 0

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        from pathlib import Path

        self.count += 1
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"val_batches_rank{trainer.global_rank}.txt").write_text(str(self.count))


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline wandb run's ``run-<id>.wandb`` file, as wandb's protobuf ``Record``s.

    wandb 0.31 ships no reader for its transaction log, so this reads the format it writes: a
    7-byte header (``:W&B``, magic, version), then LevelDB-log records in 32 KiB blocks, each chunk
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, buffer, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        buffer += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            out.append(record)
            buffer = b""
    return out


def wandb_logged(run_dir: Path, wait_s: float = 20.0) -> dict[str, Any]:
    """What an offline wandb run recorded: ``name``, ``group``, ``config`` keys, and the keys of
    every history row (tables appear as ``<key>._type`` and friends). wandb's service writes the
    file on its own; under load its records can land after the command returned (a CI run once read
    none), so this reads again for up to ``wait_s`` until the run's record is there."""
    import time

    deadline = time.monotonic() + wait_s
    records = wandb_records(run_dir)
    while not any(r.WhichOneof("record_type") == "run" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    config |= {i.key for i in run.config.update}
    history = {i.key or ".".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
               for i in r.history.item}  # fmt: skip
    artifacts = [(r.artifact.name, r.artifact.type) for r in records if r.WhichOneof("record_type") == "artifact"]
    return {"name": run.display_name, "group": run.run_group, "config": config, "history": history,
            "artifacts": artifacts}  # fmt: skip


class RecordPPOMetrics(pl.Callback):
    """Writes each rank's own PPO metrics and prompt rows per batch to ``<out>/rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json
        from pathlib import Path

        Path(self.out).mkdir(parents=True, exist_ok=True)
        record = {"batch": batch_idx, "rows": batch["rows"].tolist(), "local": pl_module.local_metrics}
        with (Path(self.out) / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_entry(main, *args: str, cwd: Path) -> tuple[int, str]:
    """Run a console command's Hydra entry (e.g. ``dpo.commands.pair.main``) in this process, as
    ``<command> *args`` typed in ``cwd``; returns its exit status and what it printed. A raw exception
    (a bug, not a user error) propagates and fails the test."""
    import contextlib
    import io
    import logging
    import os
    import sys

    old_argv, old_cwd, out = sys.argv, os.getcwd(), io.StringIO()
    root, handlers = logging.getLogger(), logging.getLogger().handlers[:]
    level = root.level
    sys.argv = [getattr(main, "__module__", "command"), *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        for handler in root.handlers[:]:  # Hydra's console and file handlers for this command
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:], root.level = handlers, level
    return rc, out.getvalue()
