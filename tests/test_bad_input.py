"""The bad-input sweep: every kind of malformation in every file type it applies to fails with an
error that names the file and the row (or is skipped and counted), before anything loads; a BOM,
duplicate rows and over-long rows are valid. Config typos are swept in tests/test_config.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo.data.formats import load_rows
from dpo.data.sources import DataError, SourceSpec

GOOD = {"prompt": "Review it:", "chosen": " A warm, moving film.", "rejected": " Dull."}
FIELDS = ("prompt", "chosen", "rejected")
# Row-level malformations: (name, the bad record, what the error says, the reason it is counted under)
ROWS = [
    ("missing", {"prompt": "p", "chosen": "c"}, r"missing field 'rejected'", "missing_field"),
    ("null", {"prompt": "p", "chosen": None, "rejected": "r"}, r"field 'chosen' is null", "null_field"),
    ("empty", {"prompt": "p", "chosen": "   ", "rejected": "r"}, r"field 'chosen' is empty", "empty_text"),
    ("wrong_type", {"prompt": "p", "chosen": "c", "rejected": 7}, r"field 'rejected' must be a string, got int",
     "not_a_string"),
]  # fmt: skip


def write(path: Path, rows: list, kind: str) -> Path:
    """``rows`` (dicts, or raw lines for the JSON-lines kinds) as a file of ``kind``."""
    if kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json_lines":
        path = path.with_suffix(".json")
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json_array":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        columns = {k: [r.get(k) if isinstance(r, dict) else None for r in rows] for k in FIELDS}
        pq.write_table(pa.table({k: pa.array(v, type=_arrow_type(v)) for k, v in columns.items()}), path)
    elif kind == "csv":
        path = path.with_suffix(".csv")
        lines = [",".join(FIELDS)] + [",".join(json.dumps(str(r.get(k, ""))) for k in FIELDS if k in r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "save_to_disk":
        import datasets

        columns = {k: [r.get(k) for r in rows] for k in FIELDS if any(k in r for r in rows)}
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(path))
    return path


def _arrow_type(values: list) -> pa.DataType:
    kinds = {type(v) for v in values if v is not None}
    return pa.int64() if kinds == {int} else pa.string() if kinds <= {str} else pa.large_string()


def source(path: Path) -> SourceSpec:
    if path.is_dir():
        return SourceSpec("fields", {"train": "train", "val": "train"}, str(path))
    return SourceSpec("fields", {"train": str(path), "val": str(path)}, None)


# Which row-level malformations each file type can hold (Parquet and save_to_disk columns have one
# type, so a wrong-typed cell can't exist there; CSV cells are all strings, and a missing cell is empty).
KINDS = {
    "jsonl": ("missing", "null", "empty", "wrong_type"),
    "json_lines": ("missing", "null", "empty", "wrong_type"),
    "json_array": ("missing", "null", "empty", "wrong_type"),
    "parquet": ("null", "empty"),
    "csv": ("empty",),
    "save_to_disk": ("null", "empty"),
}
CASES = [(kind, row) for kind, rows in KINDS.items() for row in ROWS if row[0] in rows]


@pytest.mark.parametrize(("kind", "case"), CASES, ids=[f"{k}-{c[0]}" for k, c in CASES])
def test_a_bad_row_is_named_or_skipped_and_counted(tmp_path, kind, case):
    name, bad, pattern, reason = case
    path = write(tmp_path / "data", [GOOD, bad, GOOD], kind)
    with pytest.raises(DataError, match=rf"data.*(:2|:row 2|:item 2|row 2).*{pattern}"):
        load_rows(source(path), "train")
    rows, report = load_rows(source(path), "train", on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {reason: 1}


def test_csv_missing_cells_and_extra_cells_name_the_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,chosen,rejected\n"p","c","r"\n"p","c"\n"p","c","r","extra"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data.csv:row 2: field 'rejected' is null"):
        load_rows(source(path), "train")
    rows, report = load_rows(source(path), "train", on_bad_row="skip")
    assert len(rows) == 1 and report.skipped == {"null_field": 1, "unreadable": 1}


@pytest.mark.parametrize("kind", ["jsonl", "json_lines"])
def test_invalid_utf8_and_a_truncated_last_line_name_the_line(tmp_path, kind):
    path = write(tmp_path / "data", [GOOD, GOOD], kind)
    path.write_bytes(
        path.read_bytes() + b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n' + b'{"prompt": "p", "cho'
    )
    with pytest.raises(DataError, match=rf"{path.name}:3: not valid UTF-8"):
        load_rows(source(path), "train")
    rows, report = load_rows(source(path), "train", on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {"unreadable": 2}


FILE_LEVEL = {
    # (kind, how the file is damaged) -> what the error says; these stop even under on_bad_row=skip
    ("json_array", "truncated"): r"not a valid JSON array .*truncated\?",
    ("parquet", "truncated"): r"cannot read as parquet",
    ("parquet", "undecodable"): r"cannot read as parquet",
    ("csv", "undecodable"): r"not valid UTF-8",
    ("json_array", "undecodable"): r"not valid UTF-8",
    ("save_to_disk", "undecodable"): r"cannot read the saved data set",
}


@pytest.mark.parametrize(("kind", "damage"), list(FILE_LEVEL), ids=[f"{k}-{d}" for k, d in FILE_LEVEL])
def test_a_damaged_file_is_a_clear_error_naming_it(tmp_path, kind, damage):
    path = write(tmp_path / "data", [GOOD] * 20, kind)
    target = next(path.rglob("*.arrow")) if path.is_dir() else path
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else (b"[" if kind == "json_array" else b"")
                       + b"\xff\xfe\x00garbage\x81" * 50)  # fmt: skip
    with pytest.raises(DataError, match=rf"data.*{FILE_LEVEL[(kind, damage)]}"):
        load_rows(source(path), "train", on_bad_row="skip")


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_empty_split_is_an_error(tmp_path, kind):
    if kind == "save_to_disk":
        import datasets

        path = tmp_path / "data"
        empty = datasets.Dataset.from_dict({k: [] for k in FIELDS}, features=datasets.Features(
            {k: datasets.Value("string") for k in FIELDS}))  # fmt: skip
        datasets.DatasetDict({"train": empty}).save_to_disk(str(path))
    elif kind == "parquet":
        path = write(tmp_path / "data", [GOOD], kind)
        pq.write_table(pa.table({k: pa.array([], type=pa.string()) for k in FIELDS}), path)
    else:
        path = write(tmp_path / "data", [GOOD], kind)
        path.write_text("[]" if kind == "json_array" else ("prompt,chosen,rejected\n" if kind == "csv" else ""))
    # datasets 5.2 cannot load an empty saved data set at all (IndexError): the error names the folder.
    expected = "cannot read the saved data set" if kind == "save_to_disk" else "no usable rows"
    with pytest.raises(DataError, match=rf"data.*{expected}"):
        load_rows(source(path), "train")


@pytest.mark.parametrize("kind", ["jsonl", "json_lines", "json_array", "csv"])
def test_a_utf8_byte_order_mark_is_valid(tmp_path, kind):
    path = write(tmp_path / "data", [GOOD, GOOD], kind)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rows, report = load_rows(source(path), "train")
    assert len(rows) == 2 and rows[0].prompt == GOOD["prompt"] and report.skipped == {}


def test_a_prompt_that_is_not_a_prefix_is_named(tmp_path, bpe_tokenizer):
    """Formats whose rows hold whole conversations: HH (the two dialogues must share the prompt) and
    chat (the responses must continue the prompt's messages)."""
    hh = tmp_path / "hh.jsonl"
    dialogues = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: ho\n\nAssistant: no"}
    hh.write_text(json.dumps(dialogues) + "\n")
    with pytest.raises(DataError, match=r"hh.jsonl:1: chosen and rejected dialogues differ"):
        load_rows(SourceSpec("hh", {"train": str(hh), "val": str(hh)}, None), "train")
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "hi"}]
    other = [{"role": "user", "content": "something else"}, {"role": "assistant", "content": "yes"}]
    chat.write_text(json.dumps({"prompt": turn, "chosen": other, "rejected": other}) + "\n")
    spec = SourceSpec("chat", {"train": str(chat), "val": str(chat)}, None)
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'chosen' neither starts with the prompt"):
        load_rows(spec, "train", tokenizer=bpe_tokenizer)


def test_duplicate_and_over_long_rows_are_valid_and_train(tmp_path):
    from conftest import compose_config
    from dpo.commands.train import train

    long = {"prompt": "Tell me about it. " * 40, "chosen": " Great film. " * 60, "rejected": " Bad film. " * 60}
    path = write(tmp_path / "data", [GOOD] * 6 + [long] * 2, "jsonl")
    cfg = compose_config(["data=local", f"data.source.splits.train={path}", f"data.source.splits.val={path}",
                          "data.batch_size=4", "data.micro_batch_size=4", "data.max_length=48",
                          "data.max_prompt_length=24", "trainer.max_steps=2", "logger=csv",
                          "model.tokenizer.bpe_vocab_size=300"], tmp_path / "run")  # fmt: skip
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    stats = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stats["status"] == "finished"
