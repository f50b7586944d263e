"""The preflight (dpo.config.preflight): shipped architectures, the estimate's arithmetic, the refusal."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from dpo.commands.train import preflight
from dpo.config.preflight import GB, PreflightConfig, Shape, architecture_folder, estimate, model_shape
from dpo.config.settings import ConfigError
from dpo.config.validate import plan_batch
from dpo.models.load import ModelConfig, load_config


@pytest.mark.parametrize(("name", "parameters"), [
    ("gpt2-large", 774_030_080),  # "774M" (Radford et al. 2019, Table 2)
    ("gpt-j-6b", 6_050_882_784),  # "6.05B" (the GPT-J README)
    ("pythia-2.8b", 2_775_208_960),  # "2.78B" (Biderman et al. 2023, Table 1: 2,775,208,960)
])  # fmt: skip
def test_the_shipped_architectures_build_with_their_published_parameter_counts(name, parameters):
    config = load_config(ModelConfig(architecture_folder(name)))
    shape = model_shape(config, classifier=False)
    assert shape.parameters == shape.trainable == parameters


def test_the_estimate_is_the_sum_of_its_parts_by_hand():
    """A model of 1000 parameters, 2 layers, h=8, f=32, V=100; fp32 weights, bf16 autocast; AdamW;
    copy reference; micro-batch 2 pairs (4 rows) x 10 tokens; 2 ranks sharded (FSDP2).
    weights 4 B: parameters 1000*4/2 = 2000 B, gradients 2000 B, AdamW 2 states: 4000 B, reference 2000 B;
    activations: 2 layers * 40 tokens * 2 B * (9*8 + 2*32 = 136) = 21760 B;
    logits 40 * 100 * (2 + 8) = 40000 B; total 71760 B.
    Step: global batch 8 pairs = 16 rows * 10 tokens = 160 tokens; FLOPs (6 + 2) * 1000 * 160 = 1.28e6."""
    cfg = OmegaConf.create({"model": {"dtype": "float32", "gradient_checkpointing": False},
                            "optim": {"optimizer": {"_target_": "torch.optim.AdamW"}},
                            "reference": {"kind": "copy"}, "data": {"max_length": 10, "batch_size": 8}})  # fmt: skip
    plan = plan_batch(8, 2, 2, 1)
    plan = type(plan)(**{**plan.__dict__, "mesh": (2, 1), "precision": _bf16_mixed()})
    pf = PreflightConfig(device_gb=1e-4, reserve_gb=0, peak_tflops=1e-6, mfu=0.5)
    out = estimate(cfg, plan, Shape(1000, 1000, 2, 8, 32, 100), pf, per_example=2)
    assert list(out.parts.values()) == [2000, 0, 2000, 4000, 2000, 21760, 40000, 0]
    assert out.total == 71760 and out.tokens_per_step == 160 and out.step_flops == 1.28e6
    assert out.step_seconds == pytest.approx(1.28e6 / (2 * 1e6 * 0.5))
    assert out.fits == (out.total <= 1e-4 * GB)


def test_checkpointing_keeps_layer_inputs_and_one_layer_and_rmsprop_keeps_one_state():
    cfg = OmegaConf.create({"model": {"dtype": "float32", "gradient_checkpointing": True},
                            "optim": {"optimizer": {"_target_": "torch.optim.RMSprop", "momentum": 0.9}},
                            "reference": {"kind": "none"}, "data": {"max_length": 10, "batch_size": 2}})  # fmt: skip
    plan = type(plan_batch(2, 2, 1, 1))(world_size=1, micro_batch_size=2, accumulate_grad_batches=1,
                                        precision=_bf16_mixed())  # fmt: skip
    pf = PreflightConfig(reserve_gb=0)
    parts = estimate(cfg, plan, Shape(1000, 1000, 2, 8, 32, 100), pf, per_example=1).parts
    assert parts["optimizer state"] == 1000 * 4 * 2  # square average + momentum buffer
    assert parts["reference (none)"] == 0
    # 20 tokens: 2 layers' inputs 2 * 20 * 8 * 2 B = 640 B, plus one layer recomputed 20 * 2 * 136 = 5440 B
    assert parts["activations (2 rows x 10 tokens)"] == 640 + 5440


def _bf16_mixed():
    from dpo.config.precision import plan_precision

    return plan_precision("bf16-mixed", accelerator="gpu", sharded=False, clip=None, optimizer={})


@pytest.mark.parametrize("experiment", ["tldr_dpo", "hh_dpo", "imdb_dpo"])
def test_the_preflight_estimates_each_paper_experiment_without_a_gpu(tmp_path, experiment):
    """Their model.pretrained and data splits are ??? : the experiment's architecture stands in."""
    cfg = compose_config([f"experiment={experiment}", "preflight.enabled=true"], tmp_path)
    out = preflight(cfg)
    assert out.fits and out.tokens_per_step == 64 * 2 * cfg.data.max_length


def test_gpt_j_with_adamw_on_one_80gb_gpu_is_refused_with_the_numbers(tmp_path):
    """6.05B parameters x (4 weights + 4 gradients + 8 AdamW + 4 reference) bytes = 121 GB before activations."""
    cfg = compose_config(["experiment=tldr_dpo", "preflight.enabled=true", "optim=adamw", "trainer=gpu",
                          "trainer.devices=1"], tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match=r"(?s)optimizer state\s+48\.41 GB.*does NOT fit.*does not fit 80 GB"):
        preflight(cfg)


def test_preflight_settings_are_checked_and_an_unknown_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"preflight.device_gb=0 must be > 0; preflight.mfu=2 must be in"):
        PreflightConfig(device_gb=0, mfu=2)
    cfg = compose_config(["experiment=tldr_dpo", "preflight.enabled=true", "preflight.model_config=gpt5"], tmp_path)
    with pytest.raises(ConfigError, match=r"preflight.model_config='gpt5' is neither one of \['gpt-j-6b'"):
        preflight(cfg)
