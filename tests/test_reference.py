"""Reference options: precomputed log-probs equal the live reference, LoRA's switched-off adapter
is the base model, TR-DPO syncing moves the reference as its formula says."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAST, compose_config, shrink
from dpo.commands.train import train
from dpo.systems.reference import sync_reference


def trajectory(out):
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in ("train/loss", "train/rewards/margin", "val/loss")}


def run(tmp_path, name, *overrides, cache=None):
    cfg = shrink(
        compose_config([*FAST, "trainer.max_steps=4", "trainer.log_every_n_steps=1", *overrides], tmp_path / name)
    )
    if cache is not None:
        cfg.paths.cache_dir = str(cache)
    return train(cfg)


@pytest.mark.slow
def test_precomputed_reference_gives_the_live_losses(tmp_path, caplog):
    run(tmp_path, "live", "reference=copy")
    run(tmp_path, "pre", "reference=precomputed", cache=tmp_path / "cache")
    live, pre = trajectory(tmp_path / "live"), trajectory(tmp_path / "pre")
    assert len(live["train/loss"]) == 4
    for key in live:
        # Precomputed in eval batches, trained in training batches: equal up to fp32 rounding.
        assert pre[key] == pytest.approx(live[key], abs=5e-6), key
    with caplog.at_level("INFO"):
        run(tmp_path, "pre2", "reference=precomputed", cache=tmp_path / "cache")
    assert "train: cache hit" in caplog.text and "val: cache hit" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        run(tmp_path, "pre3", "reference=precomputed", "data.max_length=60", cache=tmp_path / "cache")
    assert "train: computed" in caplog.text  # a changed length is a miss


def test_lora_reference_is_the_base_model_and_export_merges(tmp_path, tiny_model, bpe_tokenizer):
    from tests_helpers import tiny_datamodule

    from dpo.systems.base import OptimConfig
    from dpo.systems.dpo import DPOModule
    from dpo.systems.reference import LoraConfig, build_reference

    base = copy.deepcopy(tiny_model)
    policy, reference = build_reference(LoraConfig(r=4, alpha=8), tiny_model, needs_reference=True)
    optim = OptimConfig({"_target_": "torch.optim.AdamW", "lr": 1e-2})
    module = DPOModule(policy, reference, loss="dpo", loss_params={"beta": 0.1}, optim=optim)
    frozen_before = {k: v.clone() for k, v in policy.named_parameters() if not v.requires_grad}
    adapter_before = {k: v.clone() for k, v in policy.named_parameters() if v.requires_grad}
    assert adapter_before and all("lora_" in k for k in adapter_before)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    dm = tiny_datamodule(bpe_tokenizer)
    trainer.fit(module, datamodule=dm)
    for k, v in policy.named_parameters():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), f"base weight {k} changed"
    assert any(not torch.equal(v, adapter_before[k]) for k, v in policy.named_parameters() if k in adapter_before)
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base.eval()
    policy.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits  # (N, T, V)
        pos = batch["score_pos"].unsqueeze(-1).expand(-1, -1, base_logits.shape[-1])  # (N, S, V)
        from dpo.maths.logprobs import scored_logps

        expected = scored_logps(torch.gather(base_logits, 1, pos), batch)  # the base model's own log-probs
        got = module.reference.score(batch, policy)
        torch.testing.assert_close(got.chosen, expected.chosen)
        torch.testing.assert_close(got.rejected, expected.rejected)
        adapted = policy(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, base(input_ids=ids, attention_mask=mask).logits)
    from dpo.models.export import export_pretrained

    export_pretrained(policy, bpe_tokenizer, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lora_config_runs_end_to_end(tmp_path):
    metrics = run(tmp_path, "lora", "reference=lora", "reference.r=2")
    assert metrics["val/rewards/accuracy"] >= 0 and "val/kl/chosen" in metrics


def test_sync_reference_formula():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.25 * p + 0.75 * r for p, r in zip(pol.parameters(), ref.parameters(), strict=True)]
    sync_reference(ref, pol, alpha=0.25)
    for got, want in zip(ref.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    sync_reference(ref, pol, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), pol.parameters(), strict=True))


def test_tr_dpo_hard_sync_makes_the_reference_follow_and_is_checkpointed(tmp_path):
    cfg = shrink(
        compose_config([*FAST, "trainer.max_steps=2", "reference.sync_every=1", "reference.sync_alpha=1.0"], tmp_path)
    )
    import dpo.systems.dpo as entry

    seen = {}
    original = entry.DPOModule

    class Spy(original):
        def on_train_end(self):
            seen["equal"] = all(
                torch.equal(a, b) for a, b in zip(self.reference.parameters(), self.policy.parameters(), strict=True)
            )

    entry.DPOModule = Spy
    try:
        train(cfg)
    finally:
        entry.DPOModule = original
    assert seen["equal"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("reference.model.") for k in state)  # a moving reference must be saved


def test_a_moving_reference_is_evaluated_against_where_it_started():
    """A TR-DPO (or iterative DPO) reference moves; the frontier's KL must stay the KL to the starting
    model, so its evaluation reference is a frozen copy taken before training, which a sync leaves alone.
    (Before, a TR-DPO run's evaluation measured the KL to its moving reference.)"""
    from dpo.models.load import ModelConfig, load_policy
    from dpo.systems.reference import FrozenCopy

    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16, "vocab_size": 16}
    policy = load_policy(ModelConfig(None, architecture=arch))
    fixed, moving = FrozenCopy.of(policy), FrozenCopy.of(policy, sync_every=1, sync_alpha=1.0)
    assert fixed.for_evaluation(policy) is fixed
    evaluation = moving.for_evaluation(policy)
    start = copy.deepcopy(policy.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    moving.after_optimizer_step(policy, 1)  # the reference becomes the moved policy
    assert all(torch.equal(moving.model.state_dict()[k], policy.state_dict()[k]) for k in start)
    assert all(torch.equal(evaluation.model.state_dict()[k], start[k]) for k in start)
