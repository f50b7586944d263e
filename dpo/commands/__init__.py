"""Every console command (pyproject.toml scripts): dpo-train and the pipeline commands, on one Hydra front (cli.py)."""
