"""Dashboards: what wandb records of a run (names from overrides, flat config, the frontier table),
the dashboard's panels naming only metrics that are logged, and `dpo-report`'s PNGs without wandb.

One tiny two-job sweep (`dpo-train -m loss.beta=0.1,0.5`, wandb offline, the evaluation callback
on) serves every test here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from tests_helpers import run_entry, wandb_logged

from dpo.commands.dashboard import main as dashboard_main
from dpo.commands.report_figures import report
from dpo.report.dashboard import LINE_PANELS, DashboardSpec, build_report, panel_metrics
from dpo.report.figures import CURVES
from dpo.report.wandb_logging import FRONTIER_TABLE, WIN_RATES_TABLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DPO_CACHE_DIR=str(root / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "dpo.commands.train", "-m", "experiment=tiny", "debug=fast", "logger=default",
         "callbacks=reward_eval", "callbacks.reward_eval.n_prompts=4",
         "callbacks.reward_eval.generation.max_new_tokens=6",
         "callbacks.reward_eval.log_samples=true", "log_export=true", "loss.beta=0.1,0.5",
         f"hydra.sweep.dir={root / 'multi'}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root / "multi"


def test_the_wandb_run_is_named_by_its_overrides_grouped_by_its_sweep_and_holds_the_frontier(sweep):
    logged = wandb_logged(sweep / "0")
    assert logged["name"].startswith("tiny ") and logged["name"].endswith(" beta=0.1")
    assert "log_samples=true" in logged["name"].lower() and "hydra" not in logged["name"]
    assert logged["group"] == f"tiny/{sweep.name}" == wandb_logged(sweep / "1")["group"]
    assert {"loss.beta", "optim.optimizer.lr", "data.batch_size", "callbacks.reward_eval.n_prompts"} <= logged["config"]
    assert {"eval/reward", "eval/kl", "val/rewards/accuracy", "train/loss"} <= logged["history"]
    assert {"train/grad_norm", "train/tokens_per_s", "train/peak_memory_mb"} <= logged["history"]
    assert {f"{FRONTIER_TABLE}._type", "eval/samples._type"} <= logged["history"]
    assert ("tiny-" + json.loads((sweep / "0" / "run.json").read_text())["id"] + "-hf", "model") in logged["artifacts"]


def test_every_metric_a_dashboard_panel_names_is_logged(sweep, tmp_path, exported_tiny):
    """Scalars against the CSV log of a real run, tables against the wandb records of a real run and
    of a real `dpo-eval` (renaming a metric or a table breaks this test)."""
    from test_evaluate import compose_eval

    from dpo.commands.evaluate import evaluate

    with (sweep / "0" / "csv" / "metrics.csv").open() as f:
        logged = set(next(csv.reader(f))) | wandb_logged(sweep / "0")["history"]
    evaluate(compose_eval([f"policies={{tiny: {exported_tiny}}}", "judge=reward", "reward@judge.reward=vader",
                           "temperatures=[1.0]", "n_prompts=2", "generation.max_new_tokens=4", "wandb=true"],
                          tmp_path))  # fmt: skip
    logged |= wandb_logged(tmp_path)["history"]
    logged |= rlhf_metrics(tmp_path)
    for name in panel_metrics():
        assert name in logged or f"{name}._type" in logged, f"a dashboard panel names {name!r}, which nothing logs"
    assert f"{WIN_RATES_TABLE}._type" in logged
    assert [m for _, ms in LINE_PANELS for m in ms] == [m for f in CURVES.values() for _, ms in f for m in ms] + [
        "eval/reward"
    ]  # the dashboard and dpo-report draw the same curves


def rlhf_metrics(tmp_path) -> set[str]:
    """The metric names a tiny reward-model run and a tiny PPO run log to CSV."""
    from conftest import FAST, compose_config
    from dpo.commands.train import train

    names: set[str] = set()
    ppo = ["system.minibatch_size=2", "trainer.max_steps=4", "callbacks=reward_eval",  # one PPO iteration: 4 steps
           "callbacks.reward_eval.n_prompts=2", "callbacks.reward_eval.generation.max_new_tokens=4"]  # fmt: skip
    for kind, extra in (("reward_model", []), ("ppo", ppo)):
        out = tmp_path / kind
        train(compose_config([*FAST, f"system={kind}", "callbacks.samples=null", *extra], out))
        with (out / "csv" / "metrics.csv").open() as f:
            names |= set(next(csv.reader(f)))
    return names


def test_the_report_holds_the_panels_and_offline_writes_its_spec_and_the_publish_command(tmp_path):
    report_ = build_report(DashboardSpec("me", "dpo", "tiny/sweep", "loss.beta"))
    import wandb_workspaces.reports.v2 as wr

    panels = [p for b in report_.blocks if hasattr(b, "panels") for p in b.panels]
    named = {m for p in panels if isinstance(p, wr.LinePlot) for m in p.y}
    assert named == {m for _, ms in LINE_PANELS for m in ms} and len(panels) == len(LINE_PANELS) + 3
    out = tmp_path / "dash.json"
    rc, printed = run_entry(dashboard_main, "entity=me", "project=dpo", "group=tiny/sweep", "group_by=loss.beta",
                            f"out={out}", f"paths.log_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert rc == 0 and f"dpo-dashboard spec={out} publish=true" in printed
    doc = json.loads(out.read_text())
    assert doc["spec"]["group_by"] == "loss.beta" and len(doc["panels"]["lines"]) == len(LINE_PANELS)
    rc, printed = run_entry(dashboard_main, "project=dpo", "group=g", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert rc == 1 and "set entity=..." in printed


def test_dpo_report_draws_one_png_per_figure_family_from_the_run_folders(sweep, tmp_path):
    written = report([sweep], tmp_path / "figures")
    assert sorted(p.name for p in written) == ["frontier.png", "health.png", "kl.png", "loss.png", "rewards.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    proc = subprocess.run([sys.executable, "-m", "dpo.commands.report_figures", f"runs={tmp_path / 'nothing'}",
                           f"paths.log_dir={tmp_path}"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1 and "runs: no such folder" in proc.stdout
