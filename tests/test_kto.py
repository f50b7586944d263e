"""KTO: its loss by hand, its rows (unpaired data, pairs unpaired, mismatched completions), a tiny
model learning from labels, config mistakes, DDP, and TRL 1.16's own KTOTrainer on the same batch."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_online_dpo import TINY_CLI, env
from test_trl_losses import LogpsHead
from tests_helpers import tiny_data_config

from conftest import FAST, compose_config
from dpo.config.settings import ConfigError
from dpo.config.validate import validate
from dpo.data.batch import Layout
from dpo.data.datamodule import PreferenceDataModule
from dpo.data.formats import load_rows
from dpo.data.sources import DataError, PreferenceRow, SourceSpec, bundled_path
from dpo.data.unpaired import unpaired, with_kl_completions
from dpo.maths.logprobs import PairLogps
from dpo.maths.losses.unpaired import kto_loss, kto_reference_point
from dpo.systems.base import OptimConfig
from dpo.systems.kto import KTOConfig, KTOModule
from dpo.systems.reference import FrozenCopy

OPTIM = OptimConfig({"_target_": "torch.optim.AdamW", "lr": 1e-3})


def logps(completion, mismatched):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    ones = t([1.0] * len(completion))
    return PairLogps(t(completion), t(mismatched), ones, ones)


def test_kto_loss_by_hand():
    """Policy log-ratios of the completions 1 and -1, of the mismatched ones 0.5 and 1.5: z_ref = 1.
    beta 0.5, desirable first: 1 - s(0.5 (1 - 1)) = 0.5; undesirable: 2 * (1 - s(0.5 (1 - (-1)))) =
    2 (1 - s(1)) = 0.53788; the rewards 0.5 and -0.5, NaN where the kind differs."""
    policy, reference = logps([1.0, -1.0], [0.5, 1.5]), logps([0.0, 0.0], [0.0, 0.0])
    z = kto_reference_point(policy, reference)
    assert z.item() == 1.0
    out = kto_loss(policy, reference, torch.tensor([True, False]), z, beta=0.5, desirable_weight=1.0,
                   undesirable_weight=2.0)  # fmt: skip
    assert out.losses.tolist() == pytest.approx([0.5, 2 * (1 - 1 / (1 + math.exp(-1)))], abs=1e-12)
    assert out.chosen_rewards[0].item() == 0.5 and math.isnan(out.chosen_rewards[1].item())
    assert out.rejected_rewards[1].item() == -0.5 and math.isnan(out.rejected_rewards[0].item())
    # z_ref is floored at 0 and carries no gradient
    assert kto_reference_point(logps([0.0], [-3.0]), logps([0.0], [0.0])).item() == 0.0


def row(prompt, chosen, rejected=None, label=None, where="t:1"):
    return PreferenceRow(prompt, chosen, rejected, where, label)


def test_pairs_unpair_interleaved_and_each_row_gets_a_mismatched_completion():
    """Pairs: each chosen response desirable, then its rejected one undesirable, pair by pair (both
    kinds in every chunk). Mismatched completions: the row before in the chunk (the first takes the
    last), skipping back past rows of the same prompt."""
    rows = unpaired([row("p1", "a", "b"), row("p2", "c", "d")])
    assert [(r.prompt, r.chosen, r.label) for r in rows] == [("p1", "a", True), ("p1", "b", False),
                                                             ("p2", "c", True), ("p2", "d", False)]  # fmt: skip
    kl = with_kl_completions(rows, chunk=4)
    # p1/a: back 1 is p2/d (the chunk's last); p1/b: back 1 is p1/a (same prompt), back 2 p2/d;
    # p2/c: back 1 is p1/b; p2/d: back 1 is p2/c (same prompt), back 2 p1/b
    assert [r.rejected for r in kl] == ["d", "d", "b", "b"]
    same = with_kl_completions([row("p", "a", label=True), row("p", "b", label=False), row("q", "c", label=True)], 3)
    assert [r.rejected for r in same] == ["c", "c", "b"]  # p/b skips p/a back to q/c
    with pytest.raises(DataError, match="t:9: KTO trains on labelled completions"):
        unpaired([row("p", "only", where="t:9")])


def write_unpaired(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unpaired_jsonl_rows_reach_the_batch_with_their_labels_and_train(tmp_path, bpe_tokenizer, tiny_model):
    """format=unpaired reads prompt/completion/label; a bad label names its row; the batch's chosen
    segment is the completion and kto_label the labels, in the row order the sampler serves; a KTO
    step on it gives a finite loss and gradients."""
    good = [{"prompt": f"Review {i}:", "completion": f" {w} film.", "label": i % 3 != 0}
            for i, w in enumerate(["a fine", "a dull", "a good", "a bad", "an odd", "a fun"])]  # fmt: skip
    path = write_unpaired(tmp_path / "u.jsonl", good)
    spec = SourceSpec("unpaired", {"train": path, "val": path}, None)
    loaded, _ = load_rows(spec, "train")
    assert [r.label for r in loaded] == [r["label"] for r in good] and loaded[0].rejected is None
    bad = write_unpaired(tmp_path / "b.jsonl", [*good[:2], {**good[2], "label": "yes"}])
    with pytest.raises(DataError, match=r"b.jsonl:3.*'label' must be true or false"):
        load_rows(SourceSpec("unpaired", {"train": bad, "val": bad}, None), "train")
    dm = PreferenceDataModule(bpe_tokenizer, tiny_data_config(spec, batch_size=6, micro_batch_size=6), pairs=False,
                              layout=Layout.separate, unpaired=True)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["kto_label"].tolist() == [good[i]["label"] for i in batch["rows"].tolist()]
    assert batch["n_pairs"] == 6 and batch["input_ids"].shape[0] == 12  # completion rows, then mismatched rows
    module = KTOModule(tiny_model, FrozenCopy.of(tiny_model), KTOConfig(), OPTIM)
    loss, metrics = module.shared_step(batch, "train")
    loss.backward()
    assert torch.isfinite(loss) and metrics["train/kto/desirable"].item() == pytest.approx(4 / 6)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny_model.parameters())


def module_and_batch(tiny_model, bpe_tokenizer, **config):
    """A KTO module on ``tiny_model`` (reference: a frozen copy) and a batch of 8 of the bundled pairs, unpaired."""
    p = bundled_path("reviews_val.jsonl")
    spec = SourceSpec("fields", {"train": p, "val": p}, None, max_rows=8)
    dm = PreferenceDataModule(bpe_tokenizer, tiny_data_config(spec, batch_size=8, micro_batch_size=8), pairs=False,
                              layout=Layout.separate, unpaired=True)  # fmt: skip
    dm.setup("fit")
    module = KTOModule(tiny_model, FrozenCopy.of(tiny_model), KTOConfig(**config), OPTIM)
    return module, next(iter(dm.train_dataloader()))


def test_a_tiny_model_learns_the_labels(tiny_model, bpe_tokenizer):
    """Ten AdamW steps on one batch of the bundled pairs, unpaired: the desirable completions' reward
    rises above the undesirable ones' (from 0 and 0 at the start, policy == reference)."""
    module, batch = module_and_batch(tiny_model, bpe_tokenizer)
    _, first = module.shared_step(batch, "train")
    assert first["train/rewards/desirable"] == 0 and first["train/kto/kl"] == 0
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=3e-3)
    for _ in range(10):
        loss, metrics = module.shared_step(batch, "train")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert metrics["train/rewards/desirable"] > metrics["train/rewards/undesirable"] + 0.05
    assert metrics["train/kto/accuracy"] > 0.5 and metrics["train/loss"] < first["train/loss"]


def test_config_mistakes_are_refused_before_any_weights_load(tmp_path):
    def cfg(*overrides):
        return compose_config([*FAST, "system=kto", *overrides], tmp_path)

    refusals = {
        ("system.beta=0",): r"beta=0.0 must be > 0",
        ("system.desirable_weight=-1",): r"desirable_weight=-1.0 must be >= 0",
        ("data.micro_batch_size=1", "data.batch_size=1"): "micro_batch_size=1 must be >= 2",
        ("reference=none",): "reference=none can't",
        ("reference=precomputed",): "reference=precomputed can't",
    }
    for overrides, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            validate(cfg(*overrides))
    validate(cfg())


def test_loss_kl_and_rewards_equal_trls_kto_trainer(tiny_model, bpe_tokenizer):
    """TRL 1.16's ``KTOTrainer._compute_loss``, unbound on a stand-in trainer, on our batch's
    completions (rows [:B]), mismatched completions (rows [B:]) and labels, fp64: loss, KL and the
    mean rewards of each kind equal ours to 1e-9 (undesirable weight 1.5 to tell the kinds apart)."""
    from trl.trainer.kto_trainer import KTOTrainer

    module, batch = module_and_batch(tiny_model.double(), bpe_tokenizer, undesirable_weight=1.5)
    with torch.no_grad():
        for p in module.reference.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        loss, metrics = module.shared_step(batch, "train")
    n = batch["n_pairs"]
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], (batch["labels"] != -100).long()
    inputs = {"input_ids": ids[:n], "attention_mask": attention[:n], "completion_mask": mask[:n],
              "KL_input_ids": ids[n:], "KL_attention_mask": attention[n:], "KL_completion_mask": mask[n:],
              "label": batch["kto_label"]}  # fmt: skip
    gather = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=LogpsHead(module.policy).eval(), ref_model=LogpsHead(module.reference.model).eval(), beta=0.1,
        desirable_weight=1.0, undesirable_weight=1.5, loss_type="kto", calculate_KL=True, precompute_ref_logps=False,
        aux_loss_enabled=False, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather,
                                                            gather_for_metrics=gather, autocast=contextlib.nullcontext),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    with torch.no_grad():
        theirs = KTOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    logged = trainer._metrics["eval"]
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-9)
    assert metrics["train/kto/kl"].item() == pytest.approx(logged["kl"][0], abs=1e-9)
    assert metrics["train/rewards/desirable"].item() == pytest.approx(logged["rewards/chosen"][0], abs=1e-9)
    assert metrics["train/rewards/undesirable"].item() == pytest.approx(logged["rewards/rejected"][0], abs=1e-9)


KTO_CLI = [a for a in TINY_CLI if not a.startswith("system.")]


def run_kto(out, *overrides):
    """A tiny ``dpo-train system=kto`` run; its CSV rows."""
    cmd = [sys.executable, "-m", "dpo.commands.train", f"hydra.run.dir={out}", "system=kto", *KTO_CLI, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(out.parent), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return list(csv.DictReader((out / "csv" / "metrics.csv").open()))


@pytest.mark.slow
def test_under_ddp_on_two_cpu_processes_equals_one_process(tmp_path):
    """z_ref is averaged over the ranks (each rank's mean over equal shares = the global mean), the loss
    is each rank's mean: two CPU processes give one process's per-step losses and KLs."""
    one = run_kto(tmp_path / "one", "trainer.max_steps=3")
    two = run_kto(tmp_path / "two", "trainer.max_steps=3", "trainer=ddp_cpu", "data.micro_batch_size=4")
    pick = lambda rows, key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    for key in ("train/loss", "train/kto/kl", "train/rewards/desirable"):
        assert len(pick(one, key)) == 3 and pick(two, key) == pytest.approx(pick(one, key), abs=1e-5), key



def test_the_tokenized_cache_keeps_kto_labels(tmp_path):
    """Regression: the cache wrote prompt, chosen and rejected ids only, so a rank (or a rerun) that read
    KTO's rows from it lost every label (DDP's second rank failed: no kto_label in its batches)."""
    from dpo.data import cache
    from dpo.data.tokenize import TokenizedPair

    items = [TokenizedPair([1], [2, 3], [4, 5], label=True), TokenizedPair([1], [6, 7], [2, 3], label=False)]
    cache.save(tmp_path / "c.pt", items, [0, 0], {})
    assert [p.label for p in cache.load(tmp_path / "c.pt")[0]] == [True, False]
    cache.save(tmp_path / "d.pt", [TokenizedPair([1], [2, 3], [4, 5])], [0], {})  # pairs: no label
    assert cache.load(tmp_path / "d.pt")[0][0].label is None


def test_labelled_completions_train_kto_only(tmp_path):
    """SFT on labelled completions would train on the undesirable ones too: any system but KTO refuses
    data.source.format=unpaired before weights load."""
    path = str(tmp_path / "u.jsonl")
    write_unpaired(tmp_path / "u.jsonl", [{"prompt": "p", "completion": " c", "label": True}] * 8)
    over = ["data=local_unpaired", f"data.source.splits.train={path}", f"data.source.splits.val={path}"]
    for system in ("dpo", "reward_model"):
        with pytest.raises(ConfigError, match="labelled completions, not pairs"):
            validate(compose_config([*FAST, f"system={system}", "loss=sft", *over], tmp_path))
