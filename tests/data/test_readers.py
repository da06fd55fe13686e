"""readers.py: each file type round-trips to records; unreadable files name the file (and the line)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.readers import read_records
from tunesmith.errors import TunesmithError

RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "Hi"},
    {"instruction": "Count", "input": "1", "output": "2"},
]


def test_json_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS))
    assert read_records(path) == RECORDS


def test_json_lines_under_json_name(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert read_records(path) == RECORDS


def test_jsonl(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert read_records(path) == RECORDS


def test_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\nSay hi,,Hi\nCount,1,"2"\n')
    assert read_records(path) == RECORDS


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert read_records(path) == RECORDS


def test_missing_file_names_it(tmp_path):
    with pytest.raises(TunesmithError, match="nope.json: file not found"):
        read_records(tmp_path / "nope.json")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "x",\n  "output": }\n]')
    with pytest.raises(TunesmithError, match=r"broken\.json: line 2: invalid JSON at line 3"):
        read_records(path)


def test_invalid_jsonl_line_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(TunesmithError, match=r"broken\.jsonl: line 2: invalid JSON .*set skip_bad_records: true"):
        read_records(path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable record\(s\); first: .*broken\.jsonl: line 2"):
        assert read_records(path, skip_bad_records=True) == [RECORDS[0]]


def test_unsupported_suffix_and_non_object_record(tmp_path):
    with pytest.raises(TunesmithError, match="unsupported file type '.txt'"):
        read_records(tmp_path / "a.txt")
    path = tmp_path / "list.json"
    path.write_text('[{"a": 1}, [1, 2]]')
    with pytest.raises(TunesmithError, match=r"list\.json: line 1: the record is a JSON array, not an object"):
        read_records(path)


def test_json_lines_split_on_newlines_only(tmp_path):
    """U+2028 is a line separator to str.splitlines but ordinary text inside a JSON string."""
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": "one\u2028two"}\n{"a": "three"}\n', encoding="utf-8")
    assert read_records(path) == [{"a": "one\u2028two"}, {"a": "three"}]
