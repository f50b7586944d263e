"""Files that are never half written: atomic writes, a lock-guarded build-once cache, checked JSONL.

Every file this project writes for a later step to read goes through :func:`atomic_write` (a
temporary file renamed into place), so a crashed or killed job leaves the old file or the new one,
never a torn one. :func:`locked_cache` adds a file lock, so the jobs of a sweep, or the ranks of a
node, build a shared file once: the first takes the lock and writes, the others wait and read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock


@contextmanager
def atomic_path(path: str | Path):
    """A temporary path beside ``path``; renamed to ``path`` when the block exits without error.

    On an error the temporary file (or folder) is left behind under a name no reader looks for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    yield tmp
    os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path and rename it to ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def locked_cache(
    path: str | Path, build: Callable[[], Any], write: Callable[[Path, Any], None], read: Callable[[Path], Any]
) -> tuple[Any, bool]:
    """The value stored at ``path``, or ``build()`` written there atomically, under a file lock.

    Returns:
        ``(value, hit)``; ``hit`` tells whether the file was already there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return read(path), True
        value = build()
        atomic_write(path, lambda tmp: write(tmp, value))
    return value, False


def read_jsonl(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked for the ``required`` keys and their types.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: naming ``file:row`` and the key, for malformed JSON, a missing key or a wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    # Split at newlines only: str.splitlines also splits at U+2028/U+2029/U+0085, which the JSON
    # strings we write (ensure_ascii=False) may hold, e.g. in a sampled completion.
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        for key, kind in required.items():
            if key not in row:
                raise ValueError(f"{path}:{i}: missing key {key!r}")
            if not isinstance(row[key], kind):
                raise ValueError(f"{path}:{i}: {key!r} should be {kind}, got {type(row[key]).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a file: a JSONL file's ``field`` of each row, else one per non-empty text line.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a malformed JSONL row, naming ``file:row`` (:func:`read_jsonl`).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return [row[field] for row in read_jsonl(path, {field: str})]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_json(path: str | Path, value: Any) -> Path:
    """Write one JSON document, atomically."""
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON object as a line (a log of evaluations; one short write per call)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
