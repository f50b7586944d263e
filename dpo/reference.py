"""The reference model options: a frozen copy, a LoRA adapter switched off, or precomputed log-probs.

``conf/reference/<kind>.yaml`` picks one:

* ``copy``: a deep copy of the initial policy, frozen. With ``sync_every > 0`` it follows the
  policy as in TR-DPO (arXiv 2404.09656): ``ref <- alpha * policy + (1 - alpha) * ref``.
* ``lora``: the policy is base + adapter; the reference is the base with the adapter disabled.
* ``precomputed``: one pass of the initial policy over train and val before training; the
  summed log-probs are cached on disk and served in the batches, so no reference runs at all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dpo.data import cache
from dpo.logprobs import scored_logits, scored_logps


def make_reference(policy: nn.Module) -> nn.Module:
    """The frozen reference: a copy of the initial policy, so both start from identical weights."""
    return copy.deepcopy(policy)


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO update ``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = 1: hard copy)."""
    for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.lerp_(pol_p.detach().to(ref_p.dtype), alpha)


def apply_lora(policy: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | None) -> nn.Module:
    """Wrap ``policy`` with a PEFT LoRA adapter; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(policy, config)


def model_identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the initial weights: hub id and revision, local files, or config and seed."""
    m = cfg.model
    out: dict[str, Any] = {"pretrained": m.pretrained, "revision": m.revision, "dtype": m.dtype}
    if m.pretrained is None:
        out |= {"architecture": OmegaConf.to_container(m.architecture, resolve=True), "seed": cfg.seed}
    elif Path(m.pretrained).expanduser().is_dir():
        files = sorted(Path(m.pretrained).expanduser().glob("*.safetensors"))
        out["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return out


@torch.no_grad()
def compute_reference_logps(model: nn.Module, dataset: Any, collate_fn: Any, batch_size: int) -> Tensor:
    """Summed response log-probs of every pair under ``model``: (N, 2), columns chosen, rejected."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        chosen, rejected = scored_logps(scored_logits(model, batch), batch)
        out.append(torch.stack([chosen.sum, rejected.sum], dim=1).cpu())
    return torch.cat(out)


def precompute(cfg: DictConfig, policy: nn.Module, datamodule: Any, cache_dir: str | None) -> dict[str, bool]:
    """Attach reference log-probs of the initial ``policy`` to every split, from the cache if present.

    The key covers the tokenized split (its own fingerprint), the initial weights
    (:func:`model_identity`) and the precision. Returns which splits were cache hits.
    """
    hits = {}
    for split in ("train", "val"):
        key = cache.fingerprint({
            "what": "reference_logps", "data": datamodule.cache_key(split), "model": model_identity(cfg),
            "precision": str(cfg.trainer.precision),
        })  # fmt: skip

        def build(split: str = split) -> Tensor:
            return compute_reference_logps(
                policy, datamodule.datasets[split], datamodule.pair_collate, cfg.reference.batch_size
            )

        if cache_dir is None:
            values, hit = build(), False
        else:
            values, hit = cache.locked_cache(
                Path(cache_dir) / f"ref-{key}.pt",
                build,
                lambda p, v: torch.save(v, p),
                lambda p: torch.load(p, weights_only=True),
            )
        datamodule.attach_reference_logps(split, values)
        hits[split] = hit
    return hits
