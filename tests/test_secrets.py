"""Secrets come from the environment, and nothing the redaction hides lands in a run's files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config
from dpo.config.secrets import check_secrets, literal_secrets
from dpo.config.settings import ConfigError

TINY = [
    "experiment=tiny", "model.architecture.n_layer=1", "model.architecture.n_embd=32", "model.architecture.n_head=2",
    "model.tokenizer.bpe_vocab_size=300", "data.max_length=64", "data.max_prompt_length=32", "data.batch_size=8",
    "data.micro_batch_size=8", "data.source.max_rows=32", "trainer.max_steps=2", "reward=hf_classifier",
]  # fmt: skip


def files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_planted_key_appears_nowhere_in_the_run_folder(tmp_path):
    """From the environment it trains (config.yaml and wandb's config redact it; Hydra's files and
    wandb's command line hold only the interpolation); given literally it is refused, and Hydra's
    files are scrubbed before the refusal."""
    secret = "hf_fake_SECRET_planted_0123456789"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DPO_FAKE_TOKEN=secret,
               DPO_CACHE_DIR=str(tmp_path / "cache"))  # fmt: skip
    ok = subprocess.run(
        [sys.executable, "-m", "dpo.commands.train", *TINY, "reward.token=${oc.env:DPO_FAKE_TOKEN}", "logger=default",
         f"hydra.run.dir={tmp_path / 'env'}"], capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert list((tmp_path / "env" / "wandb").glob("offline-run-*"))  # wandb wrote its files, too
    assert "token: <redacted>" in (tmp_path / "env" / "config.yaml").read_text()
    assert files_holding(tmp_path / "env", secret) == []
    refused = subprocess.run(
        [sys.executable, "-m", "dpo.commands.train", *TINY, f"reward.token={secret}",
         f"hydra.run.dir={tmp_path / 'literal'}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "reward.token holds a literal secret" in said
    assert secret not in said and "Traceback" not in said  # a user mistake is one line, no traceback
    assert (tmp_path / "literal" / ".hydra" / "overrides.yaml").is_file()
    assert files_holding(tmp_path / "literal", secret) == []


def test_literal_secrets_are_refused_and_overrides_redacted():
    cfg = compose_config(["reward=hf_classifier", "reward.token=abc"], Path("unused"))
    with pytest.raises(ConfigError, match=r"reward.token holds a literal secret.*oc.env"):
        check_secrets(cfg)
    check_secrets(compose_config(["reward=hf_classifier", "reward.token=${oc.env:HOME}"], Path("unused")))
    overrides = ["reward.token=abc", "+judge.api_key='x y'", "loss.beta=0.1", "reward.token=${oc.env:T}"]
    assert literal_secrets(overrides) == ["abc", "x y"]
