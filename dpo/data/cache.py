"""On-disk cache of tokenized splits, keyed by a fingerprint of everything that shapes them.

The key covers the source (files' path, size and mtime, or hub coordinates), the parser and its
options, the tokenizer (its full serialized vocabulary and merges, special tokens and chat
template), the lengths and truncation side, and :data:`CACHE_VERSION`. A change to any of them is
a miss; a stale cache is never reused. Writes are atomic and guarded by a file lock, so the jobs of
a sweep (or the ranks of a node) tokenize once: the first takes the lock and writes, the others
wait and read. Files are plain tensors, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpo.data.tokenize import TokenizedPair
from dpo.runtime.io import locked_cache

CACHE_VERSION = 2
"""Bump when tokenization or parsing changes in a way the fingerprint can't see (2: KTO's labels are
stored and its pairs unpaired interleaved; a version-1 cache served the loss zoo's second KTO run
the first run's one-kind rows)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's full definition (not its name: a local edit must change it)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        type(tokenizer).__name__,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        getattr(tokenizer, "chat_template", None),
    ]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _flatten(seqs: list[list[int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([-1 if s is None else len(s) for s in seqs], dtype=torch.long)
    flat = torch.tensor([t for s in seqs if s is not None for t in s], dtype=torch.long)
    return flat, lengths


def _unflatten(flat: torch.Tensor, lengths: torch.Tensor) -> list[list[int] | None]:
    out, start = [], 0
    values = flat.tolist()
    for n in lengths.tolist():
        if n < 0:
            out.append(None)
        else:
            out.append(values[start : start + n])
            start += n
    return out


def save(path: Path, pairs: list[TokenizedPair], groups: list[int], meta: dict[str, Any]) -> None:
    """Write a tokenized split (:func:`dpo.runtime.io.locked_cache` makes the write atomic)."""
    blob: dict[str, Any] = {"groups": torch.tensor(groups, dtype=torch.long), "meta": json.dumps(meta)}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        blob[name], blob[name + "_len"] = _flatten([getattr(p, name) for p in pairs])
    # KTO's labels: -1 none (pairs), 0 undesirable, 1 desirable
    blob["label"] = torch.tensor([-1 if p.label is None else int(p.label) for p in pairs], dtype=torch.int8)
    torch.save(blob, path)


def load(path: Path) -> tuple[list[TokenizedPair], list[int], dict[str, Any]]:
    """Read a split written by :func:`save`."""
    blob = torch.load(path, weights_only=True)
    cols = [_unflatten(blob[n], blob[n + "_len"]) for n in ("prompt_ids", "chosen_ids", "rejected_ids")]
    labels = [None if v < 0 else bool(v) for v in blob["label"].tolist()] if "label" in blob else [None] * len(cols[0])
    pairs = [TokenizedPair(p, c, r, label=y) for p, c, r, y in zip(*cols, labels, strict=True)]
    return pairs, blob["groups"].tolist(), json.loads(blob["meta"])


def get_or_build(
    cache_dir: str | Path | None,
    key: str,
    build: Callable[[], tuple[list[TokenizedPair], list[int], dict[str, Any]]],
) -> tuple[list[TokenizedPair], list[int], dict[str, Any], bool]:
    """The cached tokenized split for ``key``, built and written under a lock on a miss.

    Returns:
        ``(pairs, groups, meta, hit)``; ``hit`` tells whether the cache was used.
    """
    if cache_dir is None:
        return (*build(), False)
    value, hit = locked_cache(Path(cache_dir) / f"{key}.pt", build, lambda p, v: save(p, *v), load)
    return (*value, hit)
