"""DPOModule (dpo.systems.dpo): ln 2 at the start, a frozen reference, checkpoints without it, resumable."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests_helpers import tiny_datamodule

from dpo.systems.base import OptimConfig, warmup_schedule
from dpo.systems.dpo import DPOModule
from dpo.systems.reference import FrozenCopy, NoReference

OPTIM = OptimConfig({"_target_": "torch.optim.AdamW", "lr": 1e-3})


def make_datamodule(tokenizer, pairs=True):
    return tiny_datamodule(tokenizer, pairs=pairs)


def make_module(model, loss="dpo", params=None, **kwargs):
    needs_reference = loss not in ("simpo", "ref_free_dpo", "sft")
    reference = FrozenCopy.of(model) if needs_reference else NoReference()
    params = params if params is not None else {"beta": 0.1}
    return DPOModule(model, reference, loss=loss, loss_params=params, optim=OPTIM, **kwargs)


def trainer(tmp_path, max_steps, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_first_step_loss_is_ln2(tiny_model, bpe_tokenizer):
    dm = make_datamodule(bpe_tokenizer)
    dm.setup()
    module = make_module(tiny_model)
    batch = next(iter(dm.train_dataloader()))
    loss, metrics = module.shared_step(batch, "train")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["train/rewards/margin"].item() == 0 and metrics["train/kl/chosen"].item() == 0


def test_reference_stays_bit_identical_while_policy_learns(tmp_path, tiny_model, bpe_tokenizer):
    module = make_module(tiny_model)
    ref_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    assert ref_before
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    t = trainer(tmp_path, max_steps=4, enable_checkpointing=False)
    t.fit(module, datamodule=make_datamodule(bpe_tokenizer))
    for k, v in module.reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(changed) > 0
    assert not module.reference.training and module.policy.training
    assert not any(p.requires_grad for p in module.reference.parameters())
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.policy.parameters()}
    assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))


def test_checkpoint_holds_no_reference_and_resumes(tmp_path, tiny_model, bpe_tokenizer):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    module = make_module(tiny_model)
    trainer(tmp_path, max_steps=2, callbacks=[ckpt]).fit(module, datamodule=make_datamodule(bpe_tokenizer))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    keys = state["state_dict"].keys()
    assert any(k.startswith("policy.") for k in keys)
    assert not any(k.startswith("reference.") for k in keys)

    torch.manual_seed(0)
    fresh = make_module(copy.deepcopy(module.policy))
    fresh_ref = {k: v.clone() for k, v in fresh.reference.state_dict().items()}
    t = trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    t.fit(
        fresh, datamodule=make_datamodule(bpe_tokenizer), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True
    )
    assert t.global_step == 3  # resumed at step 2, ran one more
    for k, v in fresh.reference.state_dict().items():
        assert torch.equal(v, fresh_ref[k])


def test_a_loss_that_needs_a_reference_refuses_none(tiny_model):
    with pytest.raises(ValueError, match="needs a reference"):
        DPOModule(tiny_model, NoReference(), loss="dpo", loss_params={"beta": 0.1}, optim=OPTIM)
    with pytest.raises(ValueError, match=r"needs parameter\(s\) \['gamma'\]"):
        DPOModule(tiny_model, NoReference(), loss="simpo", loss_params={"beta": 2.0}, optim=OPTIM)


def test_sft_module_trains_on_chosen_only(tmp_path, tiny_model, bpe_tokenizer):
    module = make_module(tiny_model, loss="sft", params={})
    dm = make_datamodule(bpe_tokenizer, pairs=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, datamodule=dm)
    assert isinstance(module.reference, NoReference) and not list(module.reference.parameters())


def test_warmup_schedule():
    """Official DPO repo warmup: (step + 1) / (warmup + 1), then constant; decays reach 0 at the end."""
    assert warmup_schedule(0, 150, 1000, "constant") == pytest.approx(1 / 151)
    assert warmup_schedule(149, 150, 1000, "constant") == pytest.approx(150 / 151)
    assert warmup_schedule(500, 150, 1000, "constant") == 1.0
    assert warmup_schedule(1000, 150, 1000, "linear") == 0.0
    assert warmup_schedule(575, 150, 1000, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay"):
        warmup_schedule(500, 150, 1000, "exp")


def test_a_step_through_the_head_in_tiles_equals_the_full_logits(tiny_model, bpe_tokenizer, monkeypatch):
    """Tiles of 3 tokens (dpo.maths.tiled): the loss, every metric (the exact KL measured in the
    reference's pass included) and the gradients equal the full logits' to fp32 rounding, after a
    step has moved the policy away from its reference (so the KL is not trivially 0)."""
    dm = make_datamodule(bpe_tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = make_module(tiny_model)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def step():
        module.zero_grad()
        loss, metrics = module.shared_step(batch, "train")
        loss.backward()
        return metrics, {k: p.grad.clone() for k, p in module.policy.named_parameters()}

    full_metrics, full_grads = step()
    monkeypatch.setattr("dpo.maths.tiled.TILE_ELEMENTS", 3 * tiny_model.config.vocab_size)
    tiled_metrics, tiled_grads = step()
    assert full_metrics["train/kl/chosen"].item() > 1e-4
    for key, value in full_metrics.items():
        torch.testing.assert_close(tiled_metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, grad in full_grads.items():
        torch.testing.assert_close(tiled_grads[key], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=key)
