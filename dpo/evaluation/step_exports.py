"""The policy exported as a Hugging Face folder every N optimizer steps, for judging a run over its
training (``dpo-eval over_training=<run folder>``: the paper's Fig. 3 right)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from dpo.models.export import export_pretrained
from dpo.runtime.log import get_logger
from dpo.systems.base import optimizer_step_ended

log = get_logger(__name__)


class StepExports(pl.Callback):
    """The policy as a Hugging Face folder every ``every_n_steps`` optimizer steps and at the end of
    training: ``<dirpath>/step<N>/`` (safetensors and tokenizer, as the run's final ``hf`` export),
    every one kept, for judging a run over its training (``dpo-eval over_training=<run folder>``,
    the paper's Fig. 3 right). Each is written under ``.step<N>.tmp`` and renamed when complete; a step
    already exported (a resumed run) is not written again. Under FSDP2 every rank takes part in the
    gather and rank 0 writes. A LoRA policy is refused: its export merges the adapter into the base
    weights in place, which must not happen mid-training.

    Args:
        dirpath: the folder of the exports.
        every_n_steps: export period in optimizer steps; 0: off.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 0) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 0:
            raise ValueError(f"callbacks.step_exports.every_n_steps must be a whole number >= 0, got {every_n_steps!r}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if self.every_n_steps and hasattr(getattr(pl_module, "policy", None), "merge_and_unload"):
            raise ValueError("callbacks.step_exports.every_n_steps with a LoRA policy: exporting merges the adapter "
                             "in place mid-training; export the final policy only (every_n_steps=0)")  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if optimizer_step_ended(trainer, batch_idx, self.every_n_steps):
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.every_n_steps:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: Any) -> Path:
        """Write ``step<N>/`` for the current optimizer step (a collective under FSDP2)."""
        final = self.dirpath / f"step{trainer.global_step:06d}"
        if final.is_dir():
            return final
        tmp = final.with_name(f".{final.name}.tmp")
        if trainer.is_global_zero and tmp.exists():  # a write that was killed
            shutil.rmtree(tmp)
        trainer.strategy.barrier("dpo.evaluation.step_exports.clean")
        export_pretrained(pl_module.policy, trainer.datamodule.tokenizer, tmp, write=trainer.is_global_zero)
        if trainer.is_global_zero:
            tmp.rename(final)
            log.info(f"exported the policy at step {trainer.global_step} -> {final}")
        trainer.strategy.barrier("dpo.evaluation.step_exports.done")
        return final


def step_exports(run_dir: str | Path) -> dict[int, Path]:
    """The policy exports of a run folder (``StepExports``), by optimizer step."""
    folder = Path(run_dir) / "exports"
    found = {int(p.name[4:]): p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()}
    return dict(sorted(found.items()))
