"""Learned reward models: a Hugging Face sequence classifier with one label, scored at the last real token.

A reward model is the policy's architecture with a scalar head (transformers'
``*ForSequenceClassification`` with ``num_labels=1``: the trunk as ``base_model``, the head as
``score``). Training (:class:`dpo.systems.reward_model.RewardModelModule`) and scoring
(:func:`learned_rm`, the ``reward=learned_rm`` config) both read the head at the last token the
attention mask keeps, with the text tokenized the way the training rows were: the tokenizer's BOS
if it adds one, the text, then one EOS. So the score a trained model gives a sampled completion is
the score its training gave the same tokens.

Hugging Face's own pooling (``model(**batch).logits``) reads the last token that is not the pad
token; when pad and EOS are the same token (GPT-2, SmolLM2) it reads the token before the EOS.
Use :func:`score_texts` (or ``reward=learned_rm``) to score as training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from dpo.data.tokenize import adds_bos
from dpo.models.load import DType, ModelConfig, disable_dropout, hub_kwargs, load_config


def head_of(model: nn.Module) -> nn.Module:
    """The scalar head of a transformers sequence classifier (``score`` for decoder models)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `score` head; use a decoder-only sequence classifier")
    return head


def last_token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(N, T) ids and (N, T) mask to (N,) fp32 scores read at each row's last kept token.

    The trunk runs once; the head runs only at those positions. Rows may be padded on either side.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)  # (N,)
    picked = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (N, H)
    return head_of(model)(picked).squeeze(-1).float()


def load_reward_model(
    cfg: ModelConfig, *, tokenizer: PreTrainedTokenizerBase, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A one-label sequence classifier on ``cfg``'s model: its pretrained trunk (the head is new,
    initialised by transformers), or random weights from ``cfg.architecture``. Dropout is off."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, DType(cfg.dtype).value), "num_labels": 1}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if cfg.pretrained is not None:
        kwargs |= hub_kwargs(cfg.pretrained, cfg.revision, what="model")
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.pretrained, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    else:
        config = load_config(cfg, tokenizer)
        config.num_labels = 1
        kwargs.pop("num_labels")
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    head_of(model)
    disable_dropout(model)
    model.train()  # from_pretrained returns eval mode; training mode matters only if dropout comes back
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def encode(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None) -> list[int]:
    """``text`` as a training row holds it: BOS if the tokenizer adds one, the tokens, one EOS.

    A text longer than ``max_length`` keeps its end (the response, which the score is about).
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id) else []
    if max_length is not None and len(head) + len(ids) > max_length:
        ids = ids[len(ids) - (max_length - len(head)) :]
    return head + ids


@torch.no_grad()
def score_texts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 32,
    max_length: int | None = None,
) -> list[float]:  # fmt: skip
    """A reward model's scores of whole texts (prompt + response), tokenized as in training."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        rows = [encode(tokenizer, t, max_length) for t in texts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out += last_token_scores(model, ids.to(device), mask.to(device)).tolist()
    return out


class LearnedReward:
    """A trained reward model as a reward function (``texts -> scores``); ``to(device)`` places it."""

    def __init__(self, path: str | Path, batch_size: int = 32, max_length: int | None = None) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"reward.path={str(path)!r} is not a reward model export (no config.json); give the `hf` folder of "
                "a `dpo-train system=reward_model` run"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward.path={str(path)!r} has {self.model.config.num_labels} labels; a reward model has 1"
            )
        self.batch_size, self.max_length = batch_size, max_length

    def to(self, device: str | torch.device) -> LearnedReward:
        self.model.to(device)
        return self

    def __call__(self, texts: list[str]) -> list[float]:
        return score_texts(self.model, self.tokenizer, texts, self.batch_size, self.max_length)
