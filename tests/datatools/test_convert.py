"""convert.py: alpaca <-> sharegpt <-> openai keeps every conversation; validate lists what training would reject."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.dataset import load_conversations, load_preference_examples
from tunesmith.data.streams import read_stream
from tunesmith.datatools.convert import convert_file

SFT = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "And another?", "input": "Not blue.", "output": "Red.", "system": "Be brief.",
     "history": [["Hi", "Hello!"], ["Name a fruit.", "Apple."]]},
]
PAIRS = [
    {"instruction": "Describe the river.", "input": "", "chosen": "Calm and warm.", "rejected": "Cold.",
     "system": "Be kind.", "history": [["Hi", "Hello!"]]},
]


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("records, load", [(SFT, load_conversations), (PAIRS, load_preference_examples)],
                         ids=["sft", "ranking"])
def test_every_format_chain_keeps_the_conversations(tmp_path, records, load):
    source = write(tmp_path / "alpaca.jsonl", records)
    expected = load(str(source), str(tmp_path))
    previous, outputs = source, []
    for target in ("sharegpt", "openai", "alpaca", "openai", "sharegpt", "alpaca"):
        out = tmp_path / f"{len(outputs)}-{target}.jsonl"
        convert_file(previous, out, target)
        if not (target == "openai" and load is load_preference_examples):  # training does not read OpenAI's DPO shape
            assert load(str(out), str(tmp_path)) == expected, target
        previous = out
        outputs.append([r for _, r in read_stream(out)])
    assert outputs[2] == outputs[5]  # alpaca after one lap equals alpaca after two
    assert all(r.get("system") == o.get("system") and r.get("history") == o.get("history")
               for r, o in zip(records, outputs[5]))


def test_openai_preference_shape(tmp_path):
    out = tmp_path / "o.jsonl"
    convert_file(write(tmp_path / "p.jsonl", PAIRS), out, "openai")
    (record,) = [r for _, r in read_stream(out)]
    assert record["preferred_output"] == [{"role": "assistant", "content": "Calm and warm."}]
    assert record["non_preferred_output"] == [{"role": "assistant", "content": "Cold."}]
    assert record["input"]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert record["input"]["messages"][-1] == {"role": "user", "content": "Describe the river."}


def test_validate_lists_bad_records_with_line_numbers(tmp_path, capsys):
    records = SFT + [{"instruction": "x", "output": ""}, {"instruction": "y"}, SFT[0]]
    write(tmp_path / "mine.jsonl", records)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    assert main(["data", "validate", "mine", "--dataset-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "mine.jsonl: line 3: turn 1 is an empty assistant response" in captured.out
    assert "mine.jsonl: line 4: missing column 'output'" in captured.out
    assert "3 records read as training reads them, 2 bad" in captured.err
    write(tmp_path / "mine.jsonl", SFT)
    assert main(["data", "validate", "mine", "--dataset-dir", str(tmp_path)]) == 0


def test_convert_stops_at_a_bad_record_unless_skipping(tmp_path, capsys):
    source = write(tmp_path / "a.jsonl", [SFT[0], {"instruction": "no answer"}, SFT[1]])
    out = tmp_path / "s.jsonl"
    assert main(["data", "convert", str(source), "-o", str(out), "--to", "sharegpt"]) == 2
    assert "a.jsonl: line 2: missing column 'output'" in capsys.readouterr().err and not out.exists()
    assert main(["data", "convert", str(source), "-o", str(out), "--to", "sharegpt", "--skip-bad"]) == 0
    assert len(list(read_stream(out))) == 2


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    source = write(tmp_path / "a.jsonl", SFT)
    assert main(["data", "convert", str(source), "-o", str(source), "--to", "openai"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert [r for _, r in read_stream(source)] == SFT
