"""`dpo-dashboard`: a wandb report of a sweep, built from code (:mod:`dpo.report.dashboard`).

    dpo-dashboard entity=<you> project=dpo group=<run group> group_by=loss.beta   # writes dashboard.json
    dpo-dashboard spec=dashboard.json publish=true                                # creates the report

Without ``publish=true`` (and always when offline) it writes the report's spec to ``out`` (default
``dashboard.json``) and prints the command that publishes it; publishing needs ``wandb login`` and
the runs synced (``wandb sync outputs/<task>/.../wandb/offline-run-*``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dpo.report.dashboard import DashboardSpec, build_report, spec_document

KEYS = ("entity", "project", "group", "group_by", "title", "out", "spec", "publish")


def parse(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments; an unknown key or a bare word is an error naming it."""
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"dpo-dashboard: {a!r} is not key=value with key in {KEYS}")
        args[key] = value
    return args


def read_spec(path: Path) -> DashboardSpec:
    """The spec a ``dpo-dashboard`` run wrote (``{"spec": {...}}``), or an error naming the file."""
    try:
        return DashboardSpec(**json.loads(path.read_text(encoding="utf-8"))["spec"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        what = f"{type(e).__name__}: {e}"
        raise ValueError(f"dpo-dashboard: spec={path} is not a spec dpo-dashboard wrote ({what})") from None


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if "spec" in args:
            spec = read_spec(Path(args["spec"]))
        else:
            missing = [k for k in ("entity", "project", "group") if not args.get(k)]
            if missing:
                raise ValueError(f"dpo-dashboard: set {', '.join(f'{k}=...' for k in missing)}")
            spec = DashboardSpec(
                args["entity"], args["project"], args["group"], args.get("group_by"), args.get("title")
            )
    except (ValueError, OSError, KeyError, TypeError) as e:
        sys.exit(str(e))
    if args.get("publish", "false").lower() == "true":
        try:
            report = build_report(spec)
        except ImportError:
            sys.exit("dpo-dashboard: publishing needs wandb-workspaces: pip install 'dpo-lightning[dashboard]'")
        report.save()
        print(f"published {report.url}")  # noqa: T201 (the command's output)
        return
    out = Path(args.get("out", "dashboard.json"))
    out.write_text(json.dumps(spec_document(spec), indent=1) + "\n")
    print(f"wrote {out}; publish it (after `wandb login` and `wandb sync` of the runs) with:\n"  # noqa: T201
          f"  dpo-dashboard spec={out} publish=true")  # fmt: skip


if __name__ == "__main__":
    main()
