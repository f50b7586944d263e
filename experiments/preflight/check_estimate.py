"""How close the preflight's memory estimate comes to the peak a CPU run measures.

Each case runs `dpo-train` in a fresh process for 3 optimizer steps on the CPU (fp32, one rank)
and reads the process's peak resident memory during training (VmHWM, reset when training starts,
read when it ends), less its resident memory after the imports (VmRSS before the config is
composed). The estimate is `dpo.config.preflight.estimate` of the same config, with no reserve (a
CPU has no CUDA context). The error is (estimate - measured) / measured.

    python experiments/preflight/check_estimate.py            # every case, the table on stdout

What a CPU peak holds that the estimate does not: the tokenizer, data and Python objects (tens of
MB), and the reference forward's transient logits; glibc is told to hand freed blocks of 128 KB or
more back at once (MALLOC_MMAP_THRESHOLD_), so the resident size follows what is allocated. What the
preflight holds that a run may not reach: every row padded to data.max_length (the bundled reviews
are shorter). So the table gives the estimate twice: as the preflight prints it (the bound), and
at the length the run's largest batch had (the formula's own error).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

CASES = {
    "SmolLM2-135M, micro 2, length 128": ["data.micro_batch_size=2", "data.batch_size=2", "data.max_length=128",
                                          "data.max_prompt_length=64"],
    "SmolLM2-135M, micro 4, length 256": ["data.micro_batch_size=4", "data.batch_size=4", "data.max_length=256",
                                          "data.max_prompt_length=128"],
    "SmolLM2-135M, micro 4, length 256, checkpointing": ["data.micro_batch_size=4", "data.batch_size=4",
                                                          "data.max_length=256", "data.max_prompt_length=128",
                                                          "model.gradient_checkpointing=true"],
    "SmolLM2-135M, micro 8, length 256, reference=none (SimPO)": ["data.micro_batch_size=8", "data.batch_size=8",
                                                                  "data.max_length=256", "data.max_prompt_length=128",
                                                                  "loss=simpo", "reference=none"],
}
COMMON = ["trainer=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=1", "callbacks=none", "logger=csv",
          "optim.warmup_steps=0", "trainer.precision=32-true"]


def status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def one(overrides: list[str], out: str) -> dict:
    """In a fresh process: the estimate and the measured peak of one case."""
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dpo.commands.cli import CONF_DIR
    from dpo.commands.train import train
    from dpo.config.preflight import PreflightConfig, estimate, model_shape
    from dpo.config.settings import typed
    from dpo.config.validate import needs_pairs, validate
    from dpo.models.load import ModelConfig, causal_lm_class, load_config, resolve

    baseline = status_kb("VmRSS")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = out
    model = resolve(typed(cfg.model, ModelConfig), cfg.paths.cache_dir)
    config = load_config(model)
    plan = validate(cfg, config, causal_lm_class(config))
    shape = model_shape(config, classifier=False)
    est = estimate(cfg, plan, shape, PreflightConfig(reserve_gb=0), 1 + needs_pairs(cfg))
    peak: dict[str, int] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            # Peak of the training steps only: loading (a GGUF dequantized to fp32, then copied into the
            # model) has its own transient peak, which is not what the estimate is about.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            peak["tokens"] = max(peak.get("tokens", 0), int(batch["input_ids"].numel()))

        def on_train_end(self, trainer, pl_module):
            peak["hwm"] = status_kb("VmHWM")

    train(cfg, extra_callbacks=[Probe()])
    rows = plan.micro_batch_size * (1 + needs_pairs(cfg))
    with open_dict(cfg):  # the same estimate at the length the data's batches had (the preflight pads to max)
        cfg.data.max_length = -(-peak["tokens"] // rows)
    at_length = estimate(cfg, plan, shape, PreflightConfig(reserve_gb=0), 1 + needs_pairs(cfg))
    return {"estimate_mb": est.total / 1e6, "parts_mb": {k: round(v / 1e6, 1) for k, v in est.parts.items()},
            "estimate_at_length_mb": at_length.total / 1e6, "measured_mb": (peak["hwm"] - baseline) / 1024,
            "batch_tokens": peak.get("tokens")}


def main() -> None:
    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    rows = []
    for name, overrides in CASES.items():
        with tempfile.TemporaryDirectory() as out:
            code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
                   f"import check_estimate as c; print('RESULT', json.dumps(c.one({overrides!r}, {out!r})))"
            # glibc returns a freed block of 128 KB or more to the system at once, so the resident size
            # follows what is allocated (by default freed arenas stay resident: loading's garbage counted)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
        r = json.loads(line[7:])
        err = (r["estimate_mb"] - r["measured_mb"]) / r["measured_mb"]
        err_len = (r["estimate_at_length_mb"] - r["measured_mb"]) / r["measured_mb"]
        rows.append(f"| {name} | {r['batch_tokens']} | {r['measured_mb']:.0f} | {r['estimate_mb']:.0f} | {err:+.0%} "
                    f"| {r['estimate_at_length_mb']:.0f} | {err_len:+.0%} |")
        print(name, json.dumps(r), file=sys.stderr)
    print(f"CPU: {cpu}; Python {platform.python_version()}")
    print("| case | tokens in the largest batch | measured peak (MB) | preflight estimate, rows padded to "
          "max_length (MB) | error | estimate at the batch's length (MB) | error |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
