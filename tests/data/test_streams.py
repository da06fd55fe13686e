"""streams.py: record-by-record reading equals whole-file parsing, with the right line numbers."""

import json

import pytest

from tunesmith.data import streams
from tunesmith.data.streams import BadRecords, Malformed, good_records, read_stream
from tunesmith.demos.synthetic import messy_text_records
from tunesmith.errors import TunesmithError


def records_of(path):
    return [record for _, record in read_stream(path)]


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_streams_like_json_load_across_chunk_boundaries(tmp_path, monkeypatch, indent):
    """Tiny chunks cut strings, emoji, escapes and numbers in half; every record still comes out whole."""
    monkeypatch.setattr(streams, "CHUNK_CHARS", 7)
    records = list(messy_text_records(60, seed=3, long_share=0.1)) + [{"n": 12345678, "x": -1.5e-7, "e": "a\\\"\n😀"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=indent is None, indent=indent), encoding="utf-8")
    assert records_of(path) == json.loads(path.read_text(encoding="utf-8"))


def test_line_numbers_point_at_each_record(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps([{"a": 1}, {"b": [1, 2]}], indent=2))  # records start on lines 2 and 5
    assert [where for where, _ in read_stream(path)] == [2, 5]
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(read_stream(lines)) == [(1, {"a": 1}), (3, {"b": 2})]


@pytest.mark.parametrize("text, line, reason", [
    ('[{"a":1},\n{"b":tru}\n]', 2, "invalid JSON at line 2"),
    ('[{"a":1},]', 1, "trailing ','"),
    ('[{"a":1}\n {"b":2}]', 2, "expected ',' or ']'"),
    ('[{"a":1}', 1, "not closed"),
    ('[{"a":1}] x', 1, "text after the closing"),
])
def test_syntax_errors_in_a_json_array_are_fatal_and_located(tmp_path, text, line, reason):
    path = tmp_path / "bad.json"
    path.write_text(text)
    items = list(read_stream(path))
    where, last = items[-1]
    assert isinstance(last, Malformed) and last.fatal and reason in last.reason and where == line


def test_non_objects_and_bad_json_lines_are_skippable(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n{"a": \n{"a": 2}\n')
    bad = BadRecords(path, skip=True)
    assert [record for _, record in good_records(bad)] == [{"a": 1}, {"a": 2}]
    assert bad.count == 2 and "line 2" in bad.examples[0] and "line 3" in bad.examples[1]
    with pytest.raises(TunesmithError, match=r"x.jsonl: line 2: the record is a JSON array"):
        list(good_records(BadRecords(path, skip=False)))
