"""Bad input gets an error naming the file and row; good files of every format load."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dpo.data.sources import DataError, FieldMap, bundled_path, read_local


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "Q: hi\n", "chosen": "hello", "rejected": "go away"}


def test_bundled_files_load():
    rows = read_local(bundled_path("reviews_val.jsonl"), FieldMap())
    assert len(rows) == 256 and all(r.rejected for r in rows)


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ({"prompt": "p", "chosen": "c"}, r"bad.jsonl:2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, r"bad.jsonl:2: field 'chosen' is empty"),
        (
            {"prompt": "p", "chosen": "c", "rejected": ["r"]},
            r"bad.jsonl:2: field 'rejected' must be a string, got list",
        ),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, r"bad.jsonl:2: field 'prompt' must be a string, got int"),
        (["not", "an", "object"], r"bad.jsonl:2: expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=pattern):
        read_local(path, FieldMap())


def test_malformed_json_and_bad_utf8_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_local(path, FieldMap())
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_local(path, FieldMap())


def test_unreadable_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        read_local(tmp_path / "nope.jsonl", FieldMap())
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown data format"):
        read_local(tmp_path / "x.txt", FieldMap())
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read as parquet"):
        read_local(tmp_path / "broken.parquet", FieldMap())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        read_local(tmp_path / "empty.jsonl", FieldMap())


def test_parquet_and_csv_with_field_mapping(tmp_path):
    frame = pd.DataFrame({"question": ["a?", "b?"], "good": ["yes", "no"], "bad": ["meh", "hm"]})
    fields = FieldMap(prompt="question", chosen="good", rejected="bad")
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    for name in ("d.parquet", "d.csv"):
        rows = read_local(tmp_path / name, fields)
        assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [("a?", "yes", "meh"), ("b?", "no", "hm")]
    frame.loc[1, "good"] = ""
    frame.to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match=r"e.csv:row 2: field 'good' is empty"):
        read_local(tmp_path / "e.csv", fields)


def test_sft_rows_need_no_rejected(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": "c"}])
    rows = read_local(path, FieldMap(rejected=None), pairs=False)
    assert rows[0].rejected is None
