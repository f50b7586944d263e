"""The win-rate figure: win rate against sampling temperature, one line per policy, with standard
errors as error bars (the layout of the paper's Figure 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo.io import atomic_write


def plot_win_rates(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Write the figure of ``results.jsonl`` rows (``policy``, ``temperature``, ``win_rate``, ``stderr``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["temperature"])
        err = [0.0 if math.isnan(r["stderr"]) else r["stderr"] for r in mine]
        ax.errorbar([r["temperature"] for r in mine], [r["win_rate"] for r in mine], yerr=err, marker="o",
                    capsize=3, label=policy)  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate against {rows[0]['baseline']}" if rows else "win rate")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out
