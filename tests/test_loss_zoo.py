"""experiments/loss_zoo/table.py: one row per finished run, its numbers read from the run's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, loss: dict, status: str = "finished") -> None:
    """A run folder as dpo-train leaves it: config.yaml, run.json, eval/ (two samples, rewards 0.2 and 0.6)."""
    (folder / "eval").mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps({"loss": loss}))
    after = {"val/rewards/accuracy": 0.625, "val/rewards/margin": 0.125, "val/kl/chosen": 3.5}
    (folder / "run.json").write_text(json.dumps({"status": status, "after": after, "seconds": 160.4}))
    (folder / "eval" / "eval.jsonl").write_text(json.dumps({"step": 20, "reward": 0.4, "kl": 2.25}) + "\n")
    samples = [{"reward": 0.2}, {"reward": 0.6}]
    (folder / "eval" / "step000020.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_the_table_has_one_row_per_finished_run_with_its_settings(tmp_path):
    """Mean 0.4 and standard error sqrt(((0.2)^2 + (0.2)^2) / 1 / 2) = 0.2; a modifier at its default is
    not shown, one away from it is; an unfinished run has no row."""
    fake_run(tmp_path / "runs" / "wpo", {"name": "dpo", "beta": 0.1, "nll_weight": 0.0, "use_weighting": True,
                                         "f_divergence_type": "reverse_kl", "ld_alpha": None})  # fmt: skip
    fake_run(tmp_path / "runs" / "zz", {"name": "dpo", "beta": 0.1}, status="running")
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/loss_zoo/table.py"), str(tmp_path / "runs"),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert lines[2] == "| wpo | dpo beta=0.1 use_weighting=True | 0.625 | 0.125 | 3.500 | 0.400 ± 0.200 | 2.25 | 160 |"
