"""The GPU acceptance script (experiments/gpu_check): every check passes; on a CPU in its --smoke
mode (the same checks, smaller), on a CUDA device in full, through run.sh as a GPU user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


@pytest.mark.gpu
@pytest.mark.slow
def test_the_gpu_acceptance_script_passes_every_check(tmp_path):
    smoke = [] if torch.cuda.is_available() else ["--smoke"]
    env = dict(os.environ, OUT=str(tmp_path))
    cmd = ["bash", str(ROOT / "experiments" / "gpu_check" / "run.sh"), *smoke, "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["pass"] and result["mode"] == ("smoke (CPU)" if smoke else "full")
    trajectory = result["trajectory"]
    assert trajectory["bf16_mixed"][0] == pytest.approx(0.6931472, abs=1e-6) == trajectory["fp32"][0]
    assert 0 < trajectory["max_gap"] <= trajectory["tolerance"]  # bf16 really ran: not bit-equal to fp32
    assert result["layouts"]["float32"]["max_abs_gap"] <= 1e-3
    assert result["sampling"]["greedy_rows_equal_generate"] == "4/4"
    assert all(result[c]["peak_memory_mb"] > 0 for c in ("trajectory", "fsdp", "layouts", "sampling"))
