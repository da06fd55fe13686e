"""A record far longer than cutoff_len is cut to a character bound before tokenizing, so its cost follows
cutoff_len; records that fit encode exactly as without the cut, and the cut is reported."""

import json

import pytest

from tunesmith.data.dataset import build_sft_examples
from tunesmith.data.encode import clip_messages, encode_pair, encode_sft, text_char_limit
from tunesmith.data.pairs import build_pair_examples
from tunesmith.data.templates import get_template

CUTOFF = 64
FITS = {"instruction": "Give three tips for staying healthy.", "output": "Eat well, exercise and sleep."}


def conversation(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]


@pytest.fixture
def longest_text(tokenizer, monkeypatch) -> list[int]:
    """Records the length of the longest text the tokenizer is asked to encode."""
    seen = [0]
    encode = tokenizer.encode

    def spy(text, *args, **kwargs):
        seen[0] = max(seen[0], len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    return seen


def write(folder, records: list[dict]) -> None:
    (folder / "data.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "data.json"}}))


def test_a_multi_megabyte_record_is_cut_before_tokenizing_and_the_rest_is_unchanged(tmp_path, tokenizer,
                                                                                      longest_text):
    huge = {"instruction": "Summarize.", "output": "the quick brown fox " * 250_000}  # 5 MB
    write(tmp_path, [FITS, huge])
    with pytest.warns(UserWarning, match="1 record\\(s\\) hold a text longer than"):
        rows = build_sft_examples("d", tmp_path, tokenizer, "chatml", CUTOFF, False, False, None, False)
    limit = text_char_limit(tokenizer, CUTOFF)
    assert limit < 100_000 and longest_text[0] < limit + 100  # the cut text plus the template's markers
    template = get_template("chatml", tokenizer)
    assert rows[0] == encode_sft(conversation(FITS), template, tokenizer, CUTOFF)  # the untruncated path
    assert len(rows[1]["input_ids"]) == CUTOFF


def test_an_over_long_record_keeps_the_tokens_it_keeps_untruncated(tmp_path, tokenizer):
    """With a short prompt, the cut changes nothing: the kept tokens lie far before the cut."""
    limit = text_char_limit(tokenizer, CUTOFF)
    long = {"instruction": "Summarize.", "output": "the quick brown fox " * (limit // 10)}  # twice the limit
    write(tmp_path, [long])
    with pytest.warns(UserWarning, match="1 record\\(s\\)"):
        rows = build_sft_examples("d", tmp_path, tokenizer, "chatml", CUTOFF, False, False, None, False)
    assert rows == [encode_sft(conversation(long), get_template("chatml", tokenizer), tokenizer, CUTOFF)]


def test_records_that_fit_are_never_cut(tmp_path, tokenizer, recwarn):
    """A record that fits in cutoff_len tokens has fewer characters than the bound, whatever its tokens."""
    limit = text_char_limit(tokenizer, CUTOFF)
    longest = max(tokenizer.get_vocab(), key=len)
    messages = [{"role": "user", "content": longest * (CUTOFF // 4)}, {"role": "assistant", "content": "ok"}]
    assert len(encode_sft(messages, get_template("chatml", tokenizer), tokenizer, 10**6)["input_ids"]) <= CUTOFF
    assert clip_messages(messages, limit) is messages
    write(tmp_path, [FITS])
    build_sft_examples("d", tmp_path, tokenizer, "chatml", CUTOFF, False, False, None, False)
    assert not [w for w in recwarn if "longer than" in str(w.message)]


def test_preference_pairs_are_cut_too(tmp_path, tokenizer, longest_text):
    huge = "a rejected answer " * 200_000
    records = [{"instruction": "Pick one.", "chosen": "Good.", "rejected": huge},
               {"instruction": "Pick again.", "chosen": "Fine.", "rejected": "Bad."}]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "pairs.json", "ranking": True}}))
    with pytest.warns(UserWarning, match="1 record\\(s\\)"):
        rows = build_pair_examples("p", tmp_path, tokenizer, "chatml", CUTOFF)
    assert longest_text[0] < text_char_limit(tokenizer, CUTOFF) + 100
    prompt = [{"role": "user", "content": "Pick again."}]
    assert rows[1] == encode_pair(prompt, "Fine.", "Bad.", get_template("chatml", tokenizer), tokenizer, CUTOFF)
