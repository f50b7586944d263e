"""Files that are never half written: atomic writes, a lock-guarded build-once cache, checked JSONL.

Every file this project writes for a later step to read goes through :func:`atomic_write` (a
temporary file renamed into place), so a crashed or killed job leaves the old file or the new one,
never a torn one. :func:`locked_cache` adds a file lock, so the jobs of a sweep, or the ranks of a
node, build a shared file once: the first takes the lock and writes, the others wait and read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock


class DataError(ValueError):
    """A data source, file or row that cannot be used; the message names the source and row."""


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a record that could not be decoded (bad UTF-8 or JSON)."""

    reason: str


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


def read_text(path: Path) -> str:
    """A text file's content, without a leading BOM (an editor's, not part of the first row).

    Raises:
        DataError: naming the file when it is missing or not UTF-8.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it a binary or another encoding?") from None


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line of a JSONL file, streamed; ``where`` is ``file:line``.

    The one JSONL reader: data sources, the pipeline's files and the judge's cache all read
    through it. Lines end at ``\n`` only (``str.splitlines`` also splits at U+2028/U+2029/U+0085,
    which the JSON strings we write with ``ensure_ascii=False`` may hold, e.g. in a completion or a
    judge's answer). A leading BOM is dropped. A line that is not UTF-8 or not JSON yields
    :class:`Unreadable`, so each caller decides: refuse, skip, or count.

    Raises:
        DataError: the file is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield where, Unreadable(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, Unreadable(f"not valid JSON ({e.msg}, column {e.colno})")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e


def read_jsonl(
    path: str | Path, required: dict[str, type | tuple[type, ...]], allow_empty: bool = False
) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked for the ``required`` keys and their types (``allow_empty``:
    a file with no row gives ``[]`` instead of an error).

    Raises:
        DataError: (a ``ValueError``) naming the file, or ``file:row`` and the key: a missing file,
            bytes that are not UTF-8, malformed JSON, a missing key or a wrong type (a bool is not a number).
    """
    rows = []
    for where, row in jsonl_records(path):
        if isinstance(row, Unreadable):
            raise DataError(f"{where}: {row.reason}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key, kind in required.items():
            if key not in row:
                raise DataError(f"{where}: missing key {key!r}")
            if not isinstance(row[key], kind) or (isinstance(row[key], bool) and bool not in _types(kind)):
                raise DataError(f"{where}: {key!r} should be {kind}, got {type(row[key]).__name__}")
        rows.append(row)
    if not rows and not allow_empty:
        raise DataError(f"{path}: no rows")
    return rows


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def finite_numbers(values: Any, where: str, key: str) -> list[float]:
    """``values`` as floats when it is a list of finite numbers (not bools, NaN or Infinity).

    Raises:
        DataError: naming ``where`` (``file:row``) and ``key``.
    """
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise DataError(f"{where}: {key!r} must be a list of finite numbers (no NaN, Infinity or booleans)")
    return [float(v) for v in values]


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a file: a JSONL file's ``field`` of each row, else one per non-empty text line.

    Raises:
        DataError: a missing or non-UTF-8 file, or a malformed JSONL row, naming ``file:row`` (:func:`read_jsonl`).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return [row[field] for row in read_jsonl(path, {field: str})]
    return [line for line in read_text(path).split("\n") if line.strip()]


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
    """Append one JSON object as a line (a log of evaluations), surviving a kill.

    The line goes out in one write and is synced. A line a kill tore before (no newline at the
    file's end) was never a row: it is cut off first, so the file stays readable by :func:`read_jsonl`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        f.seek(0)
        data = f.read()  # a log of evaluations: small
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
        f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
