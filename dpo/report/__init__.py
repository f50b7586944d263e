"""What a run reports when it ends: the summary (and, next, dashboards and figures)."""
