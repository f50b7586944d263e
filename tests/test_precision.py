"""Precision: weights that can learn (the TL;DR configs keep float32 master weights under bf16 compute;
pure low-precision weights with a learning rate too small to move them are refused before anything
loads), and the optimizer options each precision needs so that Lightning can still clip."""

from __future__ import annotations

import csv
import re

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.utilities import GradClipAlgorithmType
from omegaconf import OmegaConf, open_dict

from conftest import FAST, compose_config, shrink
from dpo.commands.cli import CONF_DIR
from dpo.commands.train import begin, build, train
from dpo.config.precision import check_update_precision, plan_precision
from dpo.config.settings import ConfigError
from dpo.config.validate import precision_plan, validate


def fraction_moved_by_one_step(tmp_path, exported_tiny, dtype: str) -> float:
    """experiment=tldr_dpo on the tiny model: one RMSprop step at lr 1e-6 (no warmup) under
    bf16-mixed; the fraction of the decoder blocks' weight-matrix entries that changed (every one of
    them gets a gradient, unlike unused embedding rows)."""
    cfg = shrink(compose_config([*FAST, "experiment=tldr_dpo", "trainer.max_steps=1", "optim.warmup_steps=0",
                                 "trainer.limit_val_batches=0"], tmp_path), exported_tiny)  # fmt: skip
    with open_dict(cfg):
        cfg.trainer.precision = "bf16-mixed"
        cfg.model.dtype = dtype
        cfg.guard.low_precision = "allow"  # to measure what the check prevents
    assert cfg.optim.optimizer.lr == 1e-6 and "RMSprop" in cfg.optim.optimizer._target_
    run = build(cfg, begin(cfg))
    blocks = {n: p for n, p in run.module.policy.named_parameters() if ".h." in n and p.dim() == 2}
    before = {n: p.detach().clone() for n, p in blocks.items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in blocks.items())
    return moved / sum(p.numel() for p in blocks.values())


def test_the_tldr_config_moves_every_weight_at_lr_1e_6_and_pure_bf16_does_not(tmp_path, exported_tiny):
    """The premise, measured: with float32 master weights (the fixed config) one step at lr 1e-6 moves
    every decoder weight; with pure bf16 weights (the old config) most updates round away."""
    assert fraction_moved_by_one_step(tmp_path / "fp32", exported_tiny, "float32") == 1.0
    assert fraction_moved_by_one_step(tmp_path / "bf16", exported_tiny, "bfloat16") < 0.5


def test_the_tldr_configs_keep_float32_master_weights_sharded(tmp_path):
    for name in ("tldr_sft", "tldr_dpo"):
        cfg = compose_config([f"experiment={name}"], tmp_path)
        assert cfg.model.dtype.value == "float32" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.strategy._target_.endswith("ModelParallelStrategy")  # trainer=fsdp


@pytest.mark.parametrize(("dtype", "lr", "refused"), [
    ("bfloat16", 1e-6, True),    # the old TL;DR config: 1e-6 < 0.02 * 2^-7 / 2 = 7.8e-5
    ("bfloat16", 5e-5, True),
    ("bfloat16", 1e-4, False),
    ("float16", 1e-6, True),     # 0.02 * 2^-10 / 2 = 9.8e-6
    ("float16", 2e-5, False),
    ("float32", 1e-9, False),
])  # fmt: skip
def test_low_precision_weights_with_a_tiny_lr_are_refused_with_the_reason(tmp_path, dtype, lr, refused):
    cfg = compose_config([*FAST, f"model.dtype={dtype}", f"optim.optimizer.lr={lr}"], tmp_path)
    if refused:
        with pytest.raises(ConfigError, match=r"round away.*model.dtype=float32 trainer.precision=(bf)?16-mixed"):
            validate(cfg)
        with open_dict(cfg):
            cfg.guard.low_precision = "allow"
    check_update_precision(cfg, precision_plan(cfg))


def test_the_old_tldr_config_is_refused_before_any_weights_load(tmp_path, exported_tiny, monkeypatch):
    import dpo.systems.assemble

    monkeypatch.setattr(dpo.systems.assemble, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = shrink(compose_config([*FAST, "experiment=tldr_dpo"], tmp_path), exported_tiny)
    with open_dict(cfg):
        cfg.model.dtype = "bfloat16"  # what experiment=tldr_dpo said before
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 with optim.optimizer.lr=1e-06"):
        begin(cfg)
    assert torch.get_default_dtype() == torch.float32


# --- the optimizer that every precision can clip (dpo.config.precision) ----------------------------------

TRAINERS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


def clipped_by_lightning(cfg, plan) -> float:
    """The gradient norm after the run's own Lightning precision plugin clips a gradient of norm 20
    with the run's optimizer (built with the options the plan decided) at ``trainer.gradient_clip_val``."""
    optimizer_node = plan.optimizer_options(OmegaConf.to_container(cfg.optim.optimizer, resolve=True))
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 10.0)  # norm 20
    optimizer = instantiate(optimizer_node, _partial_=True)([param])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.precision_plugin.clip_gradients(optimizer, cfg.trainer.gradient_clip_val, GradClipAlgorithmType.NORM)
    return float(torch.linalg.vector_norm(param.grad))


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("optim", ["adamw", "rmsprop"])
def test_every_trainer_and_optimizer_config_clips_under_bf16_mixed(tmp_path, trainer, optim):
    """The step-1 crash this pins: conf/optim/adamw.yaml's fused AdamW under any mixed-precision
    trainer made Lightning 2.6 refuse to clip ("does not allow for gradient clipping ... 'fused'
    optimizer?"). Each conf/trainer (accelerator forced to CPU) x conf/optim now clips a norm-20
    gradient to ``gradient_clip_val`` (10, or 1 where lowered below)."""
    cfg = compose_config([f"trainer={trainer}", f"optim={optim}", "trainer.precision=bf16-mixed",
                          "trainer.accelerator=cpu", "trainer.gradient_clip_val=1.0"], tmp_path)  # fmt: skip
    plan = precision_plan(cfg)
    assert plan.autocast == "bfloat16" and plan.weights == "float32" and not plan.grad_scaler
    assert plan.fused is (False if optim == "adamw" else None)
    assert clipped_by_lightning(cfg, plan) == pytest.approx(1.0, rel=1e-5)


def test_the_fused_optimizer_is_what_lightning_refuses_and_is_kept_where_it_can_clip(tmp_path):
    """The premise against the installed Lightning: the configured (fused) AdamW is refused under
    bf16-mixed; under 32-true and bf16-true (plugins that clip any optimizer) it stays fused and clips."""
    cfg = compose_config(["trainer.precision=bf16-mixed"], tmp_path)
    as_configured = plan_precision("bf16-mixed", accelerator="cpu", sharded=False, clip=None,
                                   optimizer=OmegaConf.to_container(cfg.optim.optimizer))  # fmt: skip
    assert as_configured.fused is True  # no clipping: nothing to change
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        clipped_by_lightning(cfg, as_configured)
    for precision in ("32-true", "bf16-true"):
        cfg = compose_config([f"trainer.precision={precision}"], tmp_path)
        plan = precision_plan(cfg)
        assert plan.fused is True and plan.note is None
        assert clipped_by_lightning(cfg, plan) == pytest.approx(10.0, rel=1e-5)


def test_fp16_mixed_scales_the_loss_and_keeps_a_fused_optimizer_only_without_clipping():
    """fp16 on GPUs (decided here, exercised with torch's CPU GradScaler): a GradScaler runs; with
    clipping the optimizer is unfused, so Lightning unscales before it clips; without clipping the
    fused optimizer unscales inside its step, and its update equals the unfused one on unscaled
    gradients (lr 0.1, gradient [1, -2, 3] scaled by 2^10: the step is the same to fp32 rounding)."""
    clip = plan_precision("16-mixed", accelerator="gpu", sharded=False, clip=10.0, optimizer={"fused": True})
    assert (clip.grad_scaler, clip.autocast, clip.weights, clip.fused) == (True, "float16", "float32", False)
    assert "gradient_clip_val=10" in clip.note
    bare = plan_precision("16-mixed", accelerator="gpu", sharded=False, clip=None, optimizer={"fused": True})
    assert bare.fused is True and bare.note is None

    def step(fused: bool, scaled: bool) -> torch.Tensor:
        param = torch.nn.Parameter(torch.tensor([0.5, 0.5, 0.5]))
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        scaler.scale((param * torch.tensor([1.0, -2.0, 3.0])).sum()).backward()
        scaler.step(optimizer)
        return param.detach()

    assert torch.equal(step(fused=True, scaled=True), step(fused=False, scaled=False))
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert _optimizer_handles_unscaling(torch.optim.AdamW(params, **bare.optimizer_options({"fused": True})))
    assert not _optimizer_handles_unscaling(torch.optim.AdamW(params, **clip.optimizer_options({"fused": True})))


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.precision=16-mixed"], "16-mixed on a CPU: Lightning 2.6 would silently train in bf16-mixed"),
    (["trainer=fsdp_cpu", "trainer.precision=16-mixed", "trainer.accelerator=gpu"], None),
    (["trainer=gpu"], "trainer.accelerator=gpu but no CUDA device is visible"),
    (["trainer.precision=bf17"], "trainer.precision='bf17' is not a Lightning precision"),
    (["trainer.precision=bf16-true", "optim.optimizer.lr=1e-6"], "trainer.precision=bf16-true with optim.optimizer.lr"),
    (["trainer.precision=16-true", "optim.optimizer.lr=5e-6"], "trainer.precision=16-true with optim.optimizer.lr"),
])  # fmt: skip
def test_precisions_lightning_would_change_or_refuse_later_are_refused_before_weights_load(
    tmp_path, monkeypatch, overrides, message
):
    import dpo.systems.assemble

    monkeypatch.setattr(dpo.systems.assemble, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = compose_config([*FAST, *overrides], tmp_path)
    if message is None:  # FSDP2 with fp16 AMP on a GPU machine: Lightning refuses it when the trainer is built
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        message = "16-mixed under FSDP2"
    with pytest.raises(ConfigError, match=re.escape(message)):
        begin(cfg)


def test_bf16_mixed_logs_the_norm_before_clipping_and_steps_with_the_clipped_one(tmp_path):
    """Three optimizer steps of experiment=tiny under bf16-mixed with the default fused AdamW and
    ``gradient_clip_val=1e-3``: the logged ``train/grad_norm`` is the norm Lightning saw before
    clipping (recomputed here in the same hook), and the optimizer steps on gradients clipped to 1e-3."""
    seen, stepped = [], []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, module):
            def after_step(optimizer, *args):  # the closure (backward, clipping) ran inside the step
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                stepped.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(after_step)

        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in module.policy.parameters()])))

    cfg = compose_config([*FAST, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1e-3",
                          "trainer.max_steps=3", "trainer.log_every_n_steps=1", "logger=csv"], tmp_path)  # fmt: skip
    train(cfg, extra_callbacks=[Watch()])
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("train/grad_norm")]
    logged = [float(r["train/grad_norm"]) for r in rows]
    assert len(logged) == len(seen) == len(stepped) == 3
    assert logged == pytest.approx(seen, rel=1e-4) and min(logged) > 1e-2
    assert stepped == pytest.approx([1e-3] * 3, rel=1e-3)
    assert all(float(r["train/tokens_per_s"]) > 0 and float(r["train/peak_memory_mb"]) > 0 for r in rows)


def test_fsdp2_auto_shards_over_every_process_and_wrong_sizes_are_refused(tmp_path):
    """conf/trainer/fsdp.yaml's data_parallel_size=auto was Lightning's number of nodes (1), which with
    tensor_parallel_size 1 failed at the first validation on any multi-GPU node, after the weights loaded."""
    from dpo.config.validate import device_mesh

    cfg = compose_config(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=4", "trainer.num_nodes=2"],
                         tmp_path)  # fmt: skip
    assert cfg.trainer.strategy.data_parallel_size == "auto" and device_mesh(cfg.trainer, 8) == (8, 1)
    with open_dict(cfg):
        cfg.trainer.strategy.data_parallel_size = 3
    with pytest.raises(ConfigError, match=r"data_parallel_size=3 x tensor_parallel_size=1 must equal the world size 8"):
        device_mesh(cfg.trainer, 8)
    with open_dict(cfg):
        cfg.trainer.strategy.data_parallel_size, cfg.trainer.strategy.tensor_parallel_size = "auto", 2
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2: tensor parallelism is not implemented"):
        device_mesh(cfg.trainer, 8)
    assert device_mesh(compose_config(["trainer=ddp_cpu"], tmp_path).trainer, 2) is None
