"""A wandb report for a sweep, built from code with ``wandb-workspaces`` (``dpo-dashboard``).

The panels are data (:data:`LINE_PANELS`, :data:`FRONTIER`, :data:`TABLE_CHARTS`): the training
curves are the same families ``dpo-report`` draws (:data:`dpo.report.figures.CURVES`), and a test
checks that every metric a panel names is one the trainer or ``dpo-eval`` really logs.

Report layout: a runs table of the sweep's group, grouped by the swept parameter; line charts of
reward accuracy, margin, chosen/rejected rewards, loss and KL against ``trainer/global_step`` (train
and validation); a scatter of every run's last ground-truth reward against its KL (the IMDB
frontier across a sweep); each run's own frontier (the ``eval/frontier`` table logged at every
evaluation) and ``dpo-eval``'s win rate against temperature as custom charts on their tables; the
training health panels (gradient norm before clipping, tokens per second, peak memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo.report.figures import CURVES
from dpo.report.wandb_logging import FRONTIER_TABLE, WIN_RATES_TABLE

X_AXIS = "trainer/global_step"
"""Lightning's WandbLogger x axis for every metric (lightning 2.6: ``define_metric`` on this key)."""

LINE_PANELS: list[tuple[str, list[str]]] = [panel for family in CURVES.values() for panel in family] + [
    ("ground-truth reward of held-out samples", ["eval/reward"]),
]
"""(title, metrics) of the line charts."""

FRONTIER = ("reward against KL: each run's last evaluation", "eval/kl", "eval/reward")
"""(title, x, y) of the scatter of run summaries."""

TABLE_CHARTS: list[tuple[str, str, dict[str, str]]] = [
    ("reward against KL, every evaluation of a run", FRONTIER_TABLE, {"x": "kl", "y": "reward"}),
    ("win rate against temperature (dpo-eval)", WIN_RATES_TABLE,
     {"x": "temperature", "y": "win_rate", "groupKeys": "policy"}),
]  # fmt: skip
"""(title, logged table key, chart fields) of the custom charts; tables are logged by
:func:`dpo.report.wandb_logging.log_frontier` and ``dpo-eval``."""


def panel_metrics() -> set[str]:
    """Every metric name a panel reads (charts on tables: the table key and its columns)."""
    names = {m for _, ms in LINE_PANELS for m in ms} | {FRONTIER[1], FRONTIER[2]}
    return names | {key for _, key, _ in TABLE_CHARTS}


@dataclass
class DashboardSpec:
    """What ``dpo-dashboard`` builds.

    Attributes:
        entity: the wandb entity (user or team).
        project: the wandb project the runs are in.
        group: the sweep's run group (``run_group``, or ``<task>/<sweep folder>`` of a ``-m`` sweep).
        group_by: the config key the sweep varies (e.g. ``loss.beta``); runs are grouped by it.
        title: the report's title.
    """

    entity: str
    project: str
    group: str
    group_by: str | None = None
    title: str | None = None


def build_report(spec: DashboardSpec) -> Any:
    """The report as a ``wandb_workspaces`` object (nothing sent; ``.save()`` publishes it)."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=spec.entity, project=spec.project, name=spec.group,
                       filters=f"Metric('Group') == '{spec.group}'",
                       groupby=[f"config.{spec.group_by}"] if spec.group_by else [])  # fmt: skip
    group_by = wr.Config(spec.group_by) if spec.group_by else None
    health = {title for title, _ in CURVES["health"]}
    lines = [wr.LinePlot(title=title, x=X_AXIS, y=list(metrics), groupby=group_by) for title, metrics in LINE_PANELS
             if title not in health]  # fmt: skip
    health_lines = [wr.LinePlot(title=title, x=X_AXIS, y=list(metrics), groupby=group_by)
                    for title, metrics in CURVES["health"]]  # fmt: skip
    frontier = wr.ScatterPlot(title=FRONTIER[0], x=wr.SummaryMetric(FRONTIER[1]), y=wr.SummaryMetric(FRONTIER[2]))
    tables = [wr.CustomChart.from_table(key, chart_fields=fields, chart_strings={"title": title})
              for title, key, fields in TABLE_CHARTS]  # fmt: skip
    for chart in tables:
        chart.chart_name = "wandb/line/v0" if "groupKeys" in chart.chart_fields else "wandb/scatter/v0"
    title = spec.title or f"DPO sweep {spec.group}"
    return wr.Report(
        entity=spec.entity, project=spec.project, title=title[:128],
        description=f"Runs of group {spec.group}" + (f", grouped by {spec.group_by}" if spec.group_by else ""),
        blocks=[
            wr.H1("Preference metrics"),
            wr.P("Implicit rewards beta * log(pi / pi_ref) on training batches and held-out pairs."),
            wr.PanelGrid(runsets=[runset], panels=lines[:4]),
            wr.H1("Loss and KL to the reference"),
            wr.PanelGrid(runsets=[runset], panels=lines[4:]),
            wr.H1("Reward against KL and win rates"),
            wr.PanelGrid(runsets=[runset], panels=[frontier, *tables]),
            wr.H1("Training health"),
            wr.P("Gradient norm before clipping, pair tokens per second over all ranks, peak memory per step."),
            wr.PanelGrid(runsets=[runset], panels=health_lines),
        ],
    )  # fmt: skip


def spec_document(spec: DashboardSpec) -> dict[str, Any]:
    """What an offline ``dpo-dashboard`` writes: the spec (enough to build the report again) and the
    panels it will hold, for reading. (wandb-workspaces needs the server to serialise a report: a
    run set is stored with the project's internal id.)"""
    return {
        "spec": {k: getattr(spec, k) for k in ("entity", "project", "group", "group_by", "title")},
        "panels": {"lines": [{"title": t, "x": X_AXIS, "y": ms} for t, ms in LINE_PANELS],
                   "frontier": {"title": FRONTIER[0], "x": FRONTIER[1], "y": FRONTIER[2]},
                   "tables": [{"title": t, "table": k, "fields": f} for t, k, f in TABLE_CHARTS]},
    }  # fmt: skip
