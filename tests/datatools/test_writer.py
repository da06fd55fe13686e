"""writer.py: every format written atomically reads back as written; a failed write leaves the old file."""

import pytest

from tunesmith.data.streams import read_stream
from tunesmith.datatools.writer import AtomicWriter


def records_of(path):
    return [record for _, record in read_stream(path)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_written_files_read_back(tmp_path, suffix):
    records = [{"prompt": "héllo 😀", "n": 3}, {"prompt": "a,\"b\"\nc", "n": 4}]
    path = tmp_path / f"out{suffix}"
    with AtomicWriter(path) as writer:
        for record in records:
            writer.write(record)
    expected = [{k: str(v) for k, v in r.items()} for r in records] if suffix == ".csv" else records
    assert records_of(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with AtomicWriter(path) as writer:
            writer.write({"a": 1})
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
