"""`dpo-dashboard`: a wandb report of a sweep, built from code (:mod:`dpo.report.dashboard`).

    dpo-dashboard entity=<you> project=dpo group=<run group> group_by=loss.beta   # writes dashboard.json
    dpo-dashboard spec=dashboard.json publish=true                                # creates the report

Without ``publish=true`` (and always when offline) it writes the report's spec to ``out`` (default
``dashboard.json``) and prints the command that publishes it; publishing needs ``wandb login`` and
the runs synced (``wandb sync outputs/<task>/.../wandb/offline-run-*``).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from dpo.commands.cli import entry
from dpo.config.schema import DashboardConfig
from dpo.config.settings import ConfigError, check_ranges
from dpo.report.dashboard import DashboardSpec, build_report, spec_document


def read_spec(path: Path) -> DashboardSpec:
    """The spec a ``dpo-dashboard`` run wrote (``{"spec": {...}}``), or an error naming the file."""
    try:
        return DashboardSpec(**json.loads(path.read_text(encoding="utf-8"))["spec"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        what = f"{type(e).__name__}: {e}"
        raise ConfigError(f"spec={path} is not a spec dpo-dashboard wrote ({what})") from None


def dashboard(cfg: DictConfig) -> str:
    """Build the spec (from ``spec=`` or entity/project/group) and publish it or write it to ``out``;
    returns what the command prints."""
    if cfg.spec is not None:
        spec = read_spec(Path(cfg.spec))
    else:
        missing = [k for k in ("entity", "project", "group") if not cfg.get(k)]
        if missing:
            raise ConfigError(f"set {', '.join(f'{k}=...' for k in missing)} (or spec=<a dashboard.json>)")
        spec = DashboardSpec(str(cfg.entity), str(cfg.project), str(cfg.group),
                             cfg.group_by and str(cfg.group_by), cfg.title and str(cfg.title))  # fmt: skip
    check_ranges(cfg, DashboardConfig)  # publish a bool, the rest strings
    if cfg.publish:
        try:
            report = build_report(spec)
        except ImportError:
            raise ConfigError("publish=true needs wandb-workspaces: pip install 'dpo-lightning[dashboard]'") from None
        report.save()
        return f"published {report.url}"
    out = Path(cfg.out)
    out.write_text(json.dumps(spec_document(spec), indent=1) + "\n")
    return (f"wrote {out}; publish it (after `wandb login` and `wandb sync` of the runs) with:\n"
            f"  dpo-dashboard spec={out} publish=true")  # fmt: skip


@entry("dashboard")
def main(cfg: DictConfig) -> None:
    print(dashboard(cfg))  # noqa: T201 (the command's output)


if __name__ == "__main__":
    main()
