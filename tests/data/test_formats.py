"""formats.py + loader errors: alpaca/sharegpt records become conversations; bad records are named."""

import pytest

from tunesmith.data.dataset import load_conversations, load_preference_examples
from tunesmith.data.formats import (
    BadRecord,
    PreferenceExample,
    alpaca_to_messages,
    alpaca_to_prompt,
    sharegpt_to_messages,
    sharegpt_to_prompt,
)
from tunesmith.data.registry import ALPACA_COLUMNS, OPENAI_TAGS, SHAREGPT_TAGS
from tunesmith.errors import TunesmithError


def test_alpaca_instruction_input_system_history():
    record = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
    }
    columns = {**ALPACA_COLUMNS, "system": "system", "history": "history"}
    assert alpaca_to_messages(record, columns) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


def test_alpaca_empty_or_missing_input_is_instruction_only():
    assert alpaca_to_messages({"instruction": "Q", "input": "", "output": "A"}, ALPACA_COLUMNS)[0] == {
        "role": "user",
        "content": "Q",
    }
    assert alpaca_to_messages({"instruction": "Q", "output": "A"}, ALPACA_COLUMNS)[0]["content"] == "Q"


def test_sharegpt_system_message_and_column():
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
        ]
    }
    expected = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert sharegpt_to_messages(record, {"messages": "conversations"}, SHAREGPT_TAGS) == expected
    record = {"conversations": record["conversations"][1:], "sys": "S"}
    assert (
        sharegpt_to_messages(record, {"messages": "conversations", "system": "sys"}, SHAREGPT_TAGS)
        == expected
    )


def test_rl_prompts_keep_an_answer_when_there_is_one():
    """PPO/GRPO take prompt-only records too; an SFT record's answer stays, as the reward function's reference."""
    user = {"role": "user", "content": "Q"}
    for record in ({"instruction": "Q"}, {"instruction": "Q", "input": "", "output": ""}, {"instruction": "Q", "output": None}):
        assert alpaca_to_prompt(record, ALPACA_COLUMNS) == [user]
    assert alpaca_to_prompt({"instruction": "Q", "output": "A"}, ALPACA_COLUMNS) == [user, {"role": "assistant", "content": "A"}]
    columns = {"messages": "conversations"}
    asked = {"conversations": [{"from": "human", "value": "Q"}]}
    assert sharegpt_to_prompt(asked, columns, SHAREGPT_TAGS) == [user]
    answered = {"conversations": asked["conversations"] + [{"from": "gpt", "value": "A"}]}
    assert sharegpt_to_prompt(answered, columns, SHAREGPT_TAGS)[-1] == {"role": "assistant", "content": "A"}
    with pytest.raises(BadRecord, match="must alternate"):
        sharegpt_to_prompt({"conversations": [{"from": "gpt", "value": "A"}]}, columns, SHAREGPT_TAGS)
    with pytest.raises(BadRecord, match="missing column 'instruction'"):
        alpaca_to_prompt({"output": "A"}, ALPACA_COLUMNS)


def test_openai_messages_with_tags():
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert sharegpt_to_messages(record, {"messages": "messages"}, OPENAI_TAGS)[1] == {
        "role": "assistant",
        "content": "b",
    }


def test_preference_alpaca_and_sharegpt(tmp_path, write_dataset):
    write_dataset(
        tmp_path, "pa", [{"instruction": "Q", "chosen": "good", "rejected": "bad"}], {"ranking": True}
    )
    write_dataset(
        tmp_path,
        "ps",
        [
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            }
        ],
        {
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    )
    expected = PreferenceExample([{"role": "user", "content": "Q"}], "good", "bad")
    assert load_preference_examples(["pa", "ps"], tmp_path) == [expected, expected]


GOOD = {"instruction": "Q", "input": "", "output": "A"}
BAD_ALPACA = [
    ({"instruction": "Q", "input": ""}, "missing column 'output'"),
    ({"instruction": "Q", "output": "  "}, "empty assistant response"),
    ({"instruction": ["Q"], "output": "A"}, "column 'instruction' is a list, expected text"),
    ({"instruction": "", "input": "", "output": "A"}, "both 'instruction' and 'input' are empty"),
    (
        {"instruction": "Q", "output": "A", "history": "Hi"},
        "must be a list of \\[instruction, response\\] pairs",
    ),
]
BAD_SHAREGPT = [
    ([{"from": "gpt", "value": "b"}], "turn 0 is 'assistant' but 'user' was expected"),
    ([{"from": "human", "value": "a"}], "the last turn is 'user' but must be 'assistant'"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "role 'bot', expected one of"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "empty assistant response"),
    ([{"from": "human", "value": "a"}, {"from": "function_call", "value": "{}"}], "tool-calling message"),
    ("not a list", "must be a non-empty list of messages"),
]


@pytest.mark.parametrize("bad, reason", BAD_ALPACA)
def test_bad_alpaca_record_names_file_index_and_reason(tmp_path, write_dataset, bad, reason):
    write_dataset(tmp_path, "d", [GOOD, bad], {"columns": {"history": "history"}})
    with pytest.raises(
        TunesmithError, match=rf"d\.json: record 1 \(0-based index, line 1\) of dataset 'd'.*{reason}"
    ):
        load_conversations(["d"], tmp_path)


@pytest.mark.parametrize("bad, reason", BAD_SHAREGPT)
def test_bad_sharegpt_record_names_file_index_and_reason(tmp_path, write_dataset, bad, reason):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    write_dataset(tmp_path, "s", [good, good, {"conversations": bad}], {"formatting": "sharegpt"})
    with pytest.raises(TunesmithError, match=rf"s\.json: record 2 \(0-based index, line 1\).*{reason}"):
        load_conversations(["s"], tmp_path)


def test_skip_bad_records_counts(tmp_path, write_dataset):
    write_dataset(tmp_path, "d", [GOOD, BAD_ALPACA[0][0], GOOD, BAD_ALPACA[1][0]], {})
    with pytest.warns(
        UserWarning, match=r"skipped 2 bad record\(s\) of 4; first: record 1 \(0-based index, line 1\)"
    ):
        conversations = load_conversations(["d"], tmp_path, skip_bad_records=True)
    assert len(conversations) == 2


def test_ranking_mismatch_is_explained(tmp_path, write_dataset):
    write_dataset(tmp_path, "d", [GOOD], {})
    with pytest.raises(TunesmithError, match="not a preference"):
        load_preference_examples(["d"], tmp_path)
