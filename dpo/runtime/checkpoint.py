"""Checkpoints that survive kills and preemption.

* :class:`AtomicCheckpoint` writes every checkpoint (a file, or FSDP2's distributed folder) under
  a temporary name and swaps it in when it is complete, so a kill mid-write leaves the previous
  checkpoint loadable (:func:`swap_in`, :func:`find_last`).
* :class:`PreemptionCheckpoint` makes a requeue lose nothing: inside a submitit job it catches the
  preemption/timeout signal (submitit's ``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default), saves a
  checkpoint at the end of the current optimizer step on every rank, then hands the signal to
  submitit, which resubmits the job (the one owner of requeueing; Lightning's own SLURM auto-requeue
  is switched off). The requeued job reruns in the same folder and resumes (``ckpt_path=auto``).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from dpo.runtime.log import get_logger

log = get_logger(__name__)
LAST = "last.ckpt"


def swap_in(tmp: Path, path: Path) -> None:
    """Make the complete file or folder ``tmp`` the one at ``path``.

    A file is one atomic rename. A folder (a distributed checkpoint) needs two: the old one is
    renamed to ``<path>.old`` first and deleted last, so at every instant a complete checkpoint
    exists under ``path`` or ``<path>.old`` (:func:`find_last` looks at both).
    """
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def find_last(dirpath: str | Path) -> Path | None:
    """The newest complete ``last.ckpt`` in ``dirpath`` (or the one a crash left as ``last.ckpt.old``)."""
    for name in (LAST, LAST + ".old"):
        path = Path(dirpath) / name
        if path.is_file() or (path / ".metadata").is_file() or (path / "meta.pt").is_file():
            return path
    return None


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, writing each checkpoint to ``.<name>.tmp`` and swapping it in.

    Every rank writes its part of the temporary checkpoint (FSDP2), then global rank 0 swaps it in;
    a kill at any moment leaves the previous checkpoint whole. Arguments as ModelCheckpoint's.
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        path = Path(filepath)
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero and tmp.exists():  # a write that was killed
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        trainer.strategy.barrier("dpo.runtime.checkpoint.clean")
        super()._save_checkpoint(trainer, str(tmp))  # collective; ends with a barrier
        if trainer.is_global_zero:
            swap_in(tmp, path)
        trainer.strategy.barrier("dpo.runtime.checkpoint.swap")
        self._last_checkpoint_saved = filepath

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """As ModelCheckpoint's, and with a ``monitor``, last.ckpt also when the metric did not
        improve: Lightning then writes it only with a new best, so a resumed run (or the end of
        training) would go back to the last improvement."""
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and self.monitor is not None and self._last_global_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):  # fmt: skip
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PreemptionCheckpoint(pl.Callback):
    """Inside a submitit job, save a checkpoint before the job is requeued (see module docstring).

    The signal handler only sets a flag; the checkpoint is written at the end of the optimizer step
    that is running, after every rank agreed that a signal came (a collective, so the save is too),
    and submitit's own handler runs (checkpointing the launcher and requeueing the job) when the
    next batch starts, once Lightning has logged the finished step. Outside submitit it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._received = False
        self._saved = False
        self._previous: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") and self.signum is None:
            self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
            self._previous = signal.signal(self.signum, self._note)
            log.info(f"preemption: {signal.Signals(self.signum).name} saves a checkpoint, then submitit requeues")

    def _note(self, signum: int, frame: Any) -> None:
        self._received = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.signum is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        flag = torch.tensor([float(self._received)], device=pl_module.device)
        if trainer.world_size > 1 and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            callback = trainer.checkpoint_callback
            log.info(f"preemption: saving the last checkpoint at step {trainer.global_step}, then requeueing")
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            self._saved = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._saved:
            self.hand_over()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._saved:
            self.hand_over()

    def hand_over(self) -> None:
        """Run the handler that was there before (submitit's: requeue and exit)."""
        self._received = self._saved = False
        if callable(self._previous):
            self._previous(self.signum, None)


def checkpoint_tensors(path: str | Path, with_others: bool = False) -> tuple:
    """A Lightning checkpoint's global step and its policy's tensor shapes (names without the
    ``policy.`` prefix), read without loading the weights (memory-mapped file, or a distributed
    checkpoint's metadata); ``with_others``: also the names of its other module entries.

    Raises:
        ValueError: the path is not a Lightning checkpoint.
    """
    path = Path(path)
    if path.is_dir():  # FSDP2: torch.distributed.checkpoint folder + Lightning's meta.pt
        from torch.distributed.checkpoint import FileSystemReader

        if not (path / "meta.pt").is_file():
            raise ValueError(f"{path} is a folder but not a distributed Lightning checkpoint (no meta.pt)")
        step = int(torch.load(path / "meta.pt", weights_only=True).get("global_step", 0))
        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        shapes = {k: tuple(v.size) for k, v in meta.items() if hasattr(v, "size")}
        prefix = "state_dict.policy."
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a file that is not a checkpoint
            raise ValueError(f"{path} is not a readable Lightning checkpoint ({type(e).__name__})") from None
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
        step = int(blob.get("global_step", 0))
        shapes = {k: tuple(v.shape) for k, v in blob["state_dict"].items()}
        prefix = "policy."
    policy = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    if not with_others:
        return step, policy
    root = prefix[: -len("policy.")]  # "state_dict." in a distributed checkpoint's metadata
    others = [k[len(root) :] for k in shapes if k.startswith(root) and not k.startswith(prefix)]
    return step, policy, others


def check_fits(path: str | Path, expected: dict[str, tuple[int, ...]], extras: tuple[str, ...] = ()) -> int:
    """Check that checkpoint ``path`` holds this policy and nothing of another model; return its global step.

    ``expected``: the policy's parameter names and shapes (its own ``state_dict``); the checkpoint's
    policy must hold every one of them with that shape and no other (a LoRA policy's names are read
    as its base model's, its adapters aside). ``extras``: name prefixes of the system's own modules
    beside the policy (PPO's ``value_head.``): present in the checkpoint exactly when expected. The
    reference's entries (``reference.``) are the reference's business.

    Raises:
        ValueError: naming the checkpoint and what disagrees (a few names).
    """
    step, found, others = checkpoint_tensors(path, with_others=True)

    def plain(name: str) -> str:  # a LoRA policy's names wrap the base model's
        return name.replace("base_model.model.", "").replace(".base_layer", "")

    found = {plain(k): v for k, v in found.items() if ".lora_" not in k}
    if not set(found) & set(expected):
        raise ValueError(f"{path} holds no weight of this model (e.g. {next(iter(found), 'none')!r})")
    if missing := sorted(set(expected) - set(found)):
        raise ValueError(f"{path} was saved from another model: it lacks {len(missing)} of this one's weights, "
                         f"e.g. {missing[:3]}")
    if unknown := sorted(set(found) - set(expected)):
        raise ValueError(f"{path} was saved from another model: it holds weights this one lacks, e.g. {unknown[:3]}")
    for name in sorted(expected):
        if found[name] != expected[name]:
            raise ValueError(f"{path} was saved from another model: {name} is {found[name]}, here {expected[name]}")
    have = {prefix for prefix in {n.split(".", 1)[0] + "." for n in others} if prefix != "reference."}
    if have != set(extras):
        raise ValueError(
            f"{path} was saved by another training system: it holds modules {sorted(have) or 'none'} beside the "
            f"policy, this system has {sorted(extras) or 'none'}"
        )
    return step

