"""Sources of (prompt, chosen, rejected) rows, validated before anything is tokenized.

A source reads a local JSONL, JSON-lines, Parquet or CSV file with a configurable field mapping.
Every row is checked: the fields exist, are strings, and the responses are not empty. Problems
raise :class:`DataError` naming the file and the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair (or, for SFT, a prompt and its target in ``chosen``).

    Attributes:
        prompt: the conversation or instruction up to where the response starts.
        chosen: the preferred response (the SFT target).
        rejected: the dispreferred response; None for SFT data.
        where: ``"file:row"`` for error messages.
    """

    prompt: str
    chosen: str
    rejected: str | None
    where: str


@dataclass(frozen=True)
class FieldMap:
    """Names of the fields holding prompt, chosen and rejected text in a source's rows."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str | None = "rejected"


def bundled_path(name: str) -> str:
    """Path of a data file shipped inside the package (``dpo/data/files/<name>``)."""
    path = resources.files("dpo.data") / "files" / name
    if not path.is_file():
        raise DataError(f"no bundled data file {name!r} in dpo/data/files")
    return str(path)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _read_table(path: Path, kind: str) -> list[tuple[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path, keep_default_na=False)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except Exception as e:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"{path}: cannot read as {kind}: {e}") from e
    # Row numbers are 1-based data rows (a CSV's header line is not counted).
    return [(f"{path}:row {i}", rec) for i, rec in enumerate(frame.to_dict("records"), start=1)]


_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def _field(record: Any, name: str, where: str, *, allow_empty: bool) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def read_local(path: str | Path, fields: FieldMap, *, pairs: bool = True) -> list[PreferenceRow]:
    """Read and validate every row of a local file.

    Args:
        path: a ``.jsonl``/``.json`` (one object per line), ``.parquet`` or ``.csv`` file.
        fields: where the prompt, chosen and rejected texts live in each row.
        pairs: rows must carry a rejected response (False for SFT data).

    Raises:
        DataError: unreadable file, unknown format, bad JSON or UTF-8, a missing or non-string
            field, an empty response, or a file with no rows; the message names file and row.
    """
    path = Path(path)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        records = _read_jsonl(path) if kind == "jsonl" else _read_table(path, kind)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if pairs and fields.rejected is None:
        raise DataError(f"{path}: the loss needs pairs but the field map names no rejected field")
    rows = []
    for where, rec in records:
        prompt = _field(rec, fields.prompt, where, allow_empty=True)
        chosen = _field(rec, fields.chosen, where, allow_empty=False)
        rejected = _field(rec, fields.rejected, where, allow_empty=False) if pairs else None
        rows.append(PreferenceRow(prompt, chosen, rejected, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
