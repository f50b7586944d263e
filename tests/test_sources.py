"""Reading sources: bad input gets an error naming the file and row, or is skipped and counted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo.data.formats import load_rows
from dpo.data.sources import DataError, SourceSpec, bundled_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def local(train, val=None, **options) -> SourceSpec:
    return SourceSpec("fields", {"train": str(train), "val": str(val or train)}, None, options=options)


GOOD = {"prompt": "Q: hi\n", "chosen": "hello", "rejected": "go away"}


def test_bundled_files_load():
    rows, report = load_rows(local(bundled_path("reviews_val.jsonl")), "val")
    assert len(rows) == 256 == report.rows == report.records and all(r.rejected for r in rows)


BAD_ROWS = [
    ({"prompt": "p", "chosen": "c"}, r"bad.jsonl:2: missing field 'rejected'", "missing_field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, r"bad.jsonl:2: field 'chosen' is empty", "empty_text"),
    (
        {"prompt": "p", "chosen": "c", "rejected": ["r"]},
        r"bad.jsonl:2: field 'rejected' must be a string, got list",
        "not_a_string",
    ),
    (
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        r"bad.jsonl:2: field 'prompt' must be a string, got int",
        "not_a_string",
    ),
    (["not", "an", "object"], r"bad.jsonl:2: expected an object", "not_an_object"),
]


@pytest.mark.parametrize(("bad", "pattern", "reason"), BAD_ROWS)
def test_bad_rows_name_file_and_line_or_are_counted(tmp_path, bad, pattern, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=pattern):
        load_rows(local(path), "train")
    rows, report = load_rows(local(path), "train", on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {reason: 1} and report.records == 3


def test_malformed_json_and_bad_utf8_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(local(path), "train")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        load_rows(local(path), "train")
    rows, report = load_rows(local(path), "train", on_bad_row="skip")
    assert len(rows) == 1 and report.skipped == {"unreadable": 1}


def test_unreadable_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_rows(local(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(local(tmp_path / "x.txt"), "train")
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read as parquet"):
        load_rows(local(tmp_path / "broken.parquet"), "train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(local(tmp_path / "empty.jsonl"), "train")


def test_parquet_csv_and_folders_with_field_mapping(tmp_path):
    table = pa.table({"question": ["a?", "b?"], "good": ["yes", "no"], "bad": ["meh", "hm"]})
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("question,good,bad\na?,yes,meh\nb?,no,hm\n", encoding="utf-8")
    options = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    for name in ("d.parquet", "d.csv"):
        rows, _ = load_rows(local(tmp_path / name, **options), "train")
        assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [("a?", "yes", "meh"), ("b?", "no", "hm")]
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(table, folder / "train.parquet")
    spec = SourceSpec("fields", {"train": "train", "val": "test"}, path=str(folder), options=options)
    assert len(load_rows(spec, "train")[0]) == 2
    with pytest.raises(DataError, match="no file for split 'test'"):
        load_rows(spec, "val")
    pq.write_table(pa.table({"question": ["a?"], "good": [""], "bad": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e.parquet:row 1: field 'good' is empty"):
        load_rows(local(tmp_path / "e.parquet", **options), "train")


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD, GOOD])}).save_to_disk(tmp_path / "saved")
    spec = SourceSpec("fields", {"train": "train", "val": "train"}, path=str(tmp_path / "saved"))
    rows, _ = load_rows(spec, "train")
    assert len(rows) == 2 and rows[0].where.endswith("[train]:row 1")


def test_sft_rows_need_no_rejected(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": "c"}])
    rows, _ = load_rows(local(path, rejected=None), "train")
    assert rows[0].rejected is None


def test_unknown_option_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(DataError, match="options do not fit format 'fields'"):
        load_rows(local(path, answer="x"), "train")


def test_unreachable_hub_dataset_fails_fast_with_advice(monkeypatch):
    import time

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    spec = SourceSpec("hh", {"train": "train", "val": "test"}, path="Anthropic/hh-rlhf")
    start = time.time()
    with pytest.raises(DataError, match=r"Anthropic/hh-rlhf: the hub is unreachable.*data.source.path"):
        load_rows(spec, "train")
    assert time.time() - start < 10


def test_offline_hub_dataset_not_in_cache_fails_fast():
    import time

    spec = SourceSpec("hh", {"train": "train", "val": "test"}, path="someone/not-a-dataset")
    start = time.time()
    with pytest.raises(DataError, match=r"cannot load data set someone/not-a-dataset.*data.source.path"):
        load_rows(spec, "train")
    assert time.time() - start < 10
