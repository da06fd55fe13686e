"""registry.py: dataset_info.json entries, plain file paths, hub entries and unknown names."""

import pytest

from tunesmith.data.registry import (
    OPENAI_TAGS,
    SHAREGPT_TAGS,
    detect_spec,
    load_dataset_info,
    resolve_dataset,
)
from tunesmith.errors import TunesmithError


def test_reference_registry_parses(reference_dir):
    info = load_dataset_info(reference_dir)
    assert len(info) == 104
    local, hub = 0, 0
    for name in info:
        try:
            resolve_dataset(name, reference_dir)
            local += 1
        except TunesmithError as err:
            assert "hub" in str(err) and "file_name" in str(err), str(err)
            hub += 1
    assert local > 0 and hub > 0


def test_reference_entries(reference_dir):
    alpaca = resolve_dataset("alpaca_en_demo", reference_dir)
    assert alpaca.formatting == "alpaca" and not alpaca.ranking
    assert alpaca.columns == {"prompt": "instruction", "query": "input", "response": "output"}
    assert alpaca.path == reference_dir / "alpaca_en_demo.json"
    dpo = resolve_dataset("dpo_en_demo", reference_dir)
    assert dpo.formatting == "sharegpt" and dpo.ranking
    assert dpo.columns == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    assert dpo.tags == SHAREGPT_TAGS


def test_tags_override_defaults(tmp_path, write_dataset):
    write_dataset(
        tmp_path, "chat", [], {"formatting": "sharegpt", "tags": {"role_tag": "role", "user_tag": "user"}}
    )
    spec = resolve_dataset("chat", tmp_path)
    assert spec.tags["role_tag"] == "role" and spec.tags["user_tag"] == "user"
    assert spec.tags["content_tag"] == "value"  # untouched default


def test_hub_entry_explains_offline(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"lima": {"hf_hub_url": "llamafactory/lima"}}')
    with pytest.raises(TunesmithError, match="llamafactory/lima.*cannot reach.*file_name"):
        resolve_dataset("lima", tmp_path)


def test_unknown_name_lists_closest_and_registry_path(tmp_path, write_dataset):
    write_dataset(tmp_path, "alpaca_en_demo", [], {})
    with pytest.raises(TunesmithError) as err:
        resolve_dataset("alpaca_en_dem", tmp_path)
    assert "Closest names: alpaca_en_demo" in str(err.value)
    assert str(tmp_path / "dataset_info.json") in str(err.value)


def test_plain_file_path(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "mine", [{"instruction": "a", "output": "b"}])
    assert resolve_dataset(str(path), "unused_dir").formatting == "auto"
    assert resolve_dataset("mine.json", tmp_path).path == path  # relative to dataset_dir


def test_detect_spec_formats(tmp_path):
    alpaca = detect_spec("x", tmp_path, {"instruction": "a", "output": "b", "system": "s"})
    assert (alpaca.formatting, alpaca.columns["system"]) == ("alpaca", "system")
    sharegpt = detect_spec("x", tmp_path, {"conversations": [{"from": "human", "value": "hi"}]})
    assert (sharegpt.formatting, sharegpt.tags) == ("sharegpt", SHAREGPT_TAGS)
    openai = detect_spec("x", tmp_path, {"messages": [{"role": "user", "content": "hi"}]})
    assert (openai.columns["messages"], openai.tags) == ("messages", OPENAI_TAGS)
    ranking = detect_spec("x", tmp_path, {"instruction": "a", "chosen": "b", "rejected": "c"})
    assert ranking.ranking and ranking.columns["chosen"] == "chosen"


def test_detected_optional_columns_do_not_depend_on_the_first_record(tmp_path):
    """A plain file whose first record has no system prompt still reads the system prompts of later records."""
    spec = detect_spec("x", tmp_path, {"instruction": "a", "output": "b"})
    assert spec.columns["system"] == "system" and spec.columns["history"] == "history"
