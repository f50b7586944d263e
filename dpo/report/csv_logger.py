"""A CSV logger that a resumed run continues instead of starting over."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments), whose ``metrics.csv`` survives a resume.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts. After
    :meth:`resume_at` (called before the first log), the rows the resumed checkpoint covers (``step``
    below the checkpoint's global step) are kept and the new rows appended, so a killed and
    resumed run has one file with every step once.
    """

    _resume_step: int | None = None

    def resume_at(self, global_step: int) -> None:
        """Keep the rows of steps before ``global_step`` when the file is opened."""
        self._resume_step = global_step

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 (Lightning's writer type)
        if self._experiment is not None:
            return self._experiment
        kept, header = [], []
        path = Path(self.log_dir) / "metrics.csv"
        if self._resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if row.get("step") and int(row["step"]) < self._resume_step]
        writer = super().experiment  # removes the old file
        if header:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(kept)
            writer.metrics_keys = sorted(header)
        return writer
