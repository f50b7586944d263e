"""Where rows come from: local files, local dataset folders, or the Hugging Face hub.

A source yields raw records (dicts in the dataset's own schema) with a ``where`` string naming the
file or dataset and the row, used in every error message. Turning records into preference rows is
the job of :mod:`dpo.data.formats`, so hub data and local fixtures in the same schema go through
the same parser.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from dpo.models.hub import hub_reachable, offline_mode
from dpo.runtime.io import DataError, Unreadable, jsonl_records


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair (or, for SFT, a prompt and its target in ``chosen``; or, unpaired, a
    prompt, one completion in ``chosen`` and its ``label``).

    Attributes:
        prompt: the conversation or instruction up to where the response starts.
        chosen: the preferred response (the SFT target; an unpaired row's completion).
        rejected: the dispreferred response; None for SFT and unpaired data.
        where: ``"source:row"`` for error messages.
        label: an unpaired row's label: True desirable, False undesirable (KTO); None for pairs.
    """

    prompt: str
    chosen: str
    rejected: str | None
    where: str
    label: bool | None = None


@dataclass
class SourceSpec:
    """Where a data set lives and which parser reads it (``data.source``; its config schema).

    Attributes:
        format: a parser registered in :data:`dpo.data.formats.FORMATS`.
        path: hub id, or a local folder with ``<split>.jsonl|.json|.parquet|.csv`` files or a
            ``save_to_disk`` data set; None when every split is a file path. Required in the config.
        splits: our split name (``train``, ``val``) -> the source's split name, or a file path when
            ``path`` is None.
        name: hub configuration name (``load_dataset(path, name)``).
        data_dir: hub data folder (Anthropic HH subsets: ``harmless-base``, ...).
        revision: hub revision; pin it for reproducible caches.
        max_rows: read at most this many records per split (None: all).
        options: keyword options of the parser (its keyword-only parameters; checked against them).
    """

    format: str = MISSING
    splits: dict[str, str] = MISSING
    path: str | None = MISSING
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    max_rows: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path == MISSING:
            raise DataError("data.source.path is required: a hub id or local folder, or None when splits are files")


def bundled_path(name: str) -> str:
    """Path of a data file shipped inside the package (``dpo/data/files/<name>``)."""
    path = resources.files("dpo.data") / "files" / name
    if not path.is_file():
        raise DataError(f"no bundled data file {name!r} in dpo/data/files")
    return str(path)


_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_file(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Records of a local ``.jsonl``/``.json`` (one object per line, or a JSON array), ``.parquet`` or
    ``.csv`` file. A UTF-8 byte-order mark is allowed.

    Lines that are not valid UTF-8 or JSON yield :class:`Unreadable`, so the caller can raise or
    skip them by its policy; a file that cannot be read at all raises :class:`DataError`. Row
    numbers are 1-based lines (JSON lines), array items (JSON arrays) or data rows (Parquet, CSV).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unknown data format {suffix!r}; use one of {list(_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        if suffix == ".json" and _starts_with(path, b"["):
            yield from _read_json_array(path)
        elif suffix in (".jsonl", ".json"):
            yield from jsonl_records(path)
        elif suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as f:
                for i, rec in enumerate(csv.DictReader(f), start=1):
                    if None in rec:  # more cells than the header names
                        yield f"{path}:row {i}", Unreadable(f"{len(rec[None])} more cells than the header has")
                    else:
                        yield f"{path}:row {i}", rec
        else:
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise DataError(f"{path}: cannot read as parquet: {e}") from e
            for i, rec in enumerate(table.to_pylist(), start=1):
                yield f"{path}:row {i}", rec
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(prefix)


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno}); truncated?") from None
    for i, rec in enumerate(items, start=1):
        yield f"{path}:item {i}", rec


def _local_split_file(folder: Path, split: str) -> Path:
    for suffix in _SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise DataError(f"{folder}: no file for split {split!r} (looked for {split}{{{','.join(_SUFFIXES)}}})")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def iter_records(spec: SourceSpec, split: str) -> Iterator[tuple[str, Any]]:
    """Raw records of one split, each with its ``where``; at most ``spec.max_rows`` of them."""
    if split not in spec.splits:
        raise DataError(f"data.source.splits has no {split!r} entry (has {sorted(spec.splits)})")
    target = spec.splits[split]
    if spec.path is None:
        records = read_file(target)
    elif Path(spec.path).expanduser().is_dir():
        folder = Path(spec.path).expanduser()
        records = (
            _saved_records(folder, target)
            if _is_saved_dataset(folder)
            else read_file(_local_split_file(folder, target))
        )
    else:
        records = _hub_records(spec, target)
    for i, item in enumerate(records):
        if spec.max_rows is not None and i >= spec.max_rows:
            break
        yield item


def _saved_records(folder: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets and pyarrow raise many types for a damaged folder
        raise DataError(f"{folder}: cannot read the saved data set ({type(e).__name__}: {e})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{folder}: saved data set has no split {split!r} (has {sorted(data)})")
        data = data[split]
    for i, rec in enumerate(data, start=1):
        yield f"{folder}[{split}]:row {i}", rec


def _hub_records(spec: SourceSpec, split: str) -> Iterator[tuple[str, Any]]:
    label = (
        spec.path + (f" ({spec.name})" if spec.name else "") + (f" data_dir={spec.data_dir}" if spec.data_dir else "")
    )
    advice = (
        f"Download it where you have internet (`hf download --repo-type dataset {spec.path}`) and "
        "set data.source.path to a local folder with <split>.jsonl/.parquet files or a save_to_disk "
        "folder, or set HF_HUB_OFFLINE=1 to use the Hugging Face cache."
    )
    if not offline_mode() and not hub_reachable():
        raise DataError(f"cannot load data set {label}: the hub is unreachable. {advice}")
    import datasets

    try:
        data = datasets.load_dataset(spec.path, spec.name, data_dir=spec.data_dir, revision=spec.revision, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise DataError(f"cannot load data set {label} split {split!r}: {e}. {advice}") from e
    for i, rec in enumerate(data, start=1):
        yield f"{spec.path}[{split}]:row {i}", rec


def source_fingerprint(spec: SourceSpec, split: str) -> dict[str, Any]:
    """What identifies a split's content: file identity (path, size, mtime) or hub coordinates."""
    target = spec.splits.get(split)
    out: dict[str, Any] = {"format": spec.format, "options": spec.options, "max_rows": spec.max_rows, "split": target}
    files: list[Path] = []
    if spec.path is None:
        files = [Path(target)]
    elif Path(spec.path).expanduser().is_dir():
        folder = Path(spec.path).expanduser()
        files = (
            sorted(p for p in folder.rglob("*") if p.is_file())
            if _is_saved_dataset(folder)
            else [_local_split_file(folder, target)]
        )
    else:
        out |= {"hub": spec.path, "name": spec.name, "data_dir": spec.data_dir, "revision": spec.revision}
    for f in files:
        stat = f.stat() if f.is_file() else None
        out.setdefault("files", []).append(
            [os.path.abspath(f), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
        )
    return out
