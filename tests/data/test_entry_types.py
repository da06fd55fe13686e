"""dataset_info.json entries of the wrong JSON type, and max_samples below 1, are user errors naming the
file, the dataset, the key and what it must be (not tracebacks, not silently misread)."""

import json

import pytest

from tunesmith.config.data_args import DataArgs
from tunesmith.data.dataset import load_conversations
from tunesmith.data.registry import resolve_dataset
from tunesmith.errors import TunesmithError

RECORDS = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]


def write_info(folder, entry: dict) -> None:
    (folder / "data.json").write_text(json.dumps(RECORDS))
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "data.json", **entry}}))


@pytest.mark.parametrize("entry, key, wanted", [
    ({"columns": ["instruction", "output"]}, "columns", "must be an object"),
    ({"tags": "oops"}, "tags", "must be an object"),
    ({"file_name": 123}, "file_name", "must be a string"),
    ({"ranking": "false"}, "ranking", "must be true or false"),
    ({"ranking": 0}, "ranking", "must be true or false"),
    ({"formatting": ["alpaca"]}, "formatting", 'must be "alpaca" or "sharegpt"'),
    ({"formatting": "openai"}, "formatting", 'must be "alpaca" or "sharegpt"'),
    ({"split": 1}, "split", "must be a string"),
    ({"num_samples": "10"}, "num_samples", "must be a whole number"),
    ({"num_samples": True}, "num_samples", "must be a whole number"),
    ({"columns": {"prompt": 5}}, "columns.prompt", "must be a string"),
    ({"formatting": "sharegpt", "tags": {"role_tag": None}}, "tags.role_tag", "must be a string"),
])
def test_wrong_types_name_file_entry_key_and_expectation(tmp_path, entry, key, wanted):
    write_info(tmp_path, entry)
    with pytest.raises(TunesmithError) as err:
        resolve_dataset("mine", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "dataset_info.json") in message and '"mine"' in message
    assert f'key "{key}"' in message and wanted in message, message


def test_json_booleans_are_read_as_they_are(tmp_path):
    write_info(tmp_path, {"ranking": False})
    assert resolve_dataset("mine", tmp_path).ranking is False


@pytest.mark.parametrize("text, pattern", [
    ('["not", "an", "object"]', "the file is a JSON array"),
    ('{"mine": "data.json"}', 'dataset "mine" is a JSON string'),
])
def test_a_registry_of_the_wrong_shape_says_what_it_must_be(tmp_path, text, pattern):
    (tmp_path / "dataset_info.json").write_text(text)
    with pytest.raises(TunesmithError, match=pattern):
        resolve_dataset("mine", tmp_path)


def test_a_registry_that_is_not_utf8_is_an_error(tmp_path):
    (tmp_path / "dataset_info.json").write_bytes(b'{"mine": {"file_name": "\xff"}}')
    with pytest.raises(TunesmithError, match="not UTF-8"):
        resolve_dataset("mine", tmp_path)


@pytest.mark.parametrize("value", [0, -1])
def test_max_samples_below_one_is_refused(tmp_path, value):
    assert [key for key, _ in DataArgs(max_samples=value).problems()] == ["max_samples"]
    assert DataArgs(max_samples=1).problems() == []
    write_info(tmp_path, {})
    with pytest.raises(TunesmithError, match=f"max_samples must be a positive number.*got {value}"):
        load_conversations("mine", tmp_path, max_samples=value)
