"""The summary a training run prints when it ends: what changed on held-out data, and where it all is."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

VALIDATION = (
    ("val/rewards/accuracy", "reward accuracy"),
    ("val/rewards/margin", "reward margin"),
    ("val/rm/accuracy", "reward model accuracy"),
    ("val/rm/margin", "reward model margin"),
    ("val/loss", "loss"),
    ("val/logps_per_token/chosen", "chosen log-prob/token"),
    ("val/kl/chosen", "KL(policy||ref) on chosen"),
)


def change(label: str, first: float, last: float) -> str:
    """One summary line: a quantity before and after training."""
    return f"  {label:<28} {first:>9.4f} -> {last:>9.4f}"


@runtime_checkable
class Reporter(Protocol):
    """A callback with lines for the run summary (e.g. :class:`dpo.evaluation.reward_kl.RewardKLEval`)."""

    def report(self) -> list[str]: ...


def reports(callbacks: Iterable[Any]) -> list[str]:
    """The summary lines of every callback that reports."""
    return [line for cb in callbacks if isinstance(cb, Reporter) for line in cb.report()]


@dataclass
class RunSummary:
    """Everything the summary shows; filled in by the entry point as the run goes.

    Attributes:
        title: e.g. ``loss=dpo(beta=0.1)``.
        steps: optimizer steps trained.
        seconds: wall time of the run.
        held_out: ``(count, description)`` of the held-out pairs.
        before, after: validation metrics before the first and after the last step.
        sections: lines from the callbacks that report (:func:`reports`).
        data_stats: per split, the loader's statistics (skipped and filtered rows).
        checkpoint, export, out_dir: where the run's files are; ``logs`` names what ``out_dir`` holds.
    """

    title: str
    steps: int
    seconds: float
    held_out: tuple[int, str]
    before: dict[str, float]
    after: dict[str, float]
    sections: list[str] = field(default_factory=list)
    data_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: str | None = None
    export: Path | None = None
    out_dir: Path | None = None
    logs: str = "config.yaml, csv/metrics.csv"

    def render(self) -> str:
        """The summary as lines of text, framed."""
        lines = [
            "=" * 72,
            f"dpo-train finished: {self.title} steps={self.steps} time={self.seconds:.0f}s",
            f"held-out pairs: {self.held_out[0]} from {self.held_out[1]}",
        ]
        before, after = self.before, self.after
        lines += [change(label, before.get(k, float("nan")), after[k]) for k, label in VALIDATION if k in after]
        lines += self.sections
        for split, stats in self.data_stats.items():
            if stats["skipped"] or stats["filtered"]:
                lines.append(f"data/{split}: skipped bad rows {stats['skipped']}, filtered {stats['filtered']}")
        lines += [
            f"checkpoint: {self.checkpoint or '-'}",
            f"hf export:  {self.export or '-'}",
            f"logs:       {self.out_dir} ({self.logs})",
            "=" * 72,
        ]
        return "\n".join(lines)
