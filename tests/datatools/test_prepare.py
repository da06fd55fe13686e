"""`tunesmith data prepare` / `stats`: each step gives what its jq command gives, and bad input is handled safely.

The jq comparisons run the issue's reference chain with the real jq (skipped where jq is not
installed); the other tests pin the same semantics by hand, so they hold without jq too.
"""

import json
import random
import shutil
import signal
import subprocess

import pytest
from transformers import AutoTokenizer

from tunesmith.cli import main
from tunesmith.data.streams import read_stream
from tunesmith.datatools import blocks
from tunesmith.datatools.prepare import PrepareOptions, Sample, make_pipeline, prepare
from tunesmith.demos.synthetic import messy_text_records
from tunesmith.errors import TunesmithError

JQ = shutil.which("jq")
needs_jq = pytest.mark.skipif(JQ is None, reason="jq is not installed")
RENAME = [("input_text", "prompt"), ("target_text", "response")]
JQ_STEPS = [  # (jq filter, the same step as PrepareOptions), each applied to the previous step's output
    ('select(.input_text != null and .input_text != "" and .target_text != null and .target_text != "")',
     PrepareOptions(require=["input_text", "target_text"])),
    ("{prompt: .input_text, response: .target_text}", PrepareOptions(rename=RENAME)),
    (". | .char_cnt = ((.prompt | length) + (.response | length) | floor)", PrepareOptions(char_count="char_cnt")),
    ("select(.char_cnt < 4096)", PrepareOptions(count_fields=["prompt", "response"], max_chars=4096)),
]


def read(path) -> list:
    return [record for _, record in read_stream(path)]


def jq(args: list, source, target) -> None:
    with open(source, "rb") as f_in, open(target, "wb") as f_out:
        subprocess.run([JQ, *args], stdin=f_in, stdout=f_out, check=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A JSON array of 600 messy records: nulls, empties, missing fields, Chinese, emoji, 10% long texts."""
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    path.write_text(json.dumps(list(messy_text_records(600, seed=1, long_share=0.1)), ensure_ascii=False, indent=1),
                    encoding="utf-8")
    return path


@needs_jq
def test_each_step_matches_its_jq_command(demo, tmp_path):
    jq(["-c", ".[]"], demo, tmp_path / "jq0.jsonl")
    prepare(demo, tmp_path / "ts0.jsonl", PrepareOptions())
    assert read(tmp_path / "ts0.jsonl") == read(tmp_path / "jq0.jsonl")
    for i, (jq_filter, options) in enumerate(JQ_STEPS, start=1):
        jq(["-c", jq_filter], tmp_path / f"jq{i - 1}.jsonl", tmp_path / f"jq{i}.jsonl")
        prepare(tmp_path / f"jq{i - 1}.jsonl", tmp_path / f"ts{i}.jsonl", options)
        expected = read(tmp_path / f"jq{i}.jsonl")
        assert read(tmp_path / f"ts{i}.jsonl") == expected, jq_filter
        assert 0 < len(expected) <= 600
    assert len(read(tmp_path / "jq4.jsonl")) < len(read(tmp_path / "jq3.jsonl"))  # the length filter bit


ONE_SHOT = ["--require", "input_text,target_text", "--rename", "input_text:prompt,target_text:response",
            "--char-count", "char_cnt", "--max-chars", "4096"]


@needs_jq
def test_one_command_equals_the_whole_jq_chain_and_stats_equals_the_awk_total(demo, tmp_path, capsys):
    jq(["-c", ".[]"], demo, tmp_path / "chain.jsonl")
    for jq_filter, _ in JQ_STEPS:
        jq(["-c", jq_filter], tmp_path / "chain.jsonl", tmp_path / "next.jsonl")
        (tmp_path / "next.jsonl").replace(tmp_path / "chain.jsonl")
    assert main(["data", "prepare", str(demo), "-o", str(tmp_path / "out.jsonl"), *ONE_SHOT]) == 0
    survivors = read(tmp_path / "chain.jsonl")
    assert read(tmp_path / "out.jsonl") == survivors  # without --sample: every survivor, in input order

    total = subprocess.run(f"{JQ} -c '.char_cnt // 0' {tmp_path / 'chain.jsonl'} | awk '{{s+=$1}} END {{print s}}'",
                           shell=True, capture_output=True, text=True, check=True).stdout.strip()
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "out.jsonl"), "--field", "char_cnt", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == len(survivors) and stats["char_cnt"]["total"] == int(total)


def test_sample_is_a_seeded_subset_in_input_order(demo, tmp_path):
    full = tmp_path / "full.jsonl"
    main(["data", "prepare", str(demo), "-o", str(full), *ONE_SHOT])
    survivors = read(full)
    samples = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        main(["data", "prepare", str(demo), "-o", str(tmp_path / f"{name}.jsonl"), *ONE_SHOT, "--sample", "50",
              "--seed", str(seed)])
        samples[name] = read(tmp_path / f"{name}.jsonl")
    assert len(samples["a"]) == 50 and samples["a"] == samples["b"] and samples["a"] != samples["c"]
    remaining = iter(survivors)
    assert all(any(record == other for other in remaining) for record in samples["a"])  # a subsequence
    main(["data", "prepare", str(demo), "-o", str(tmp_path / "all.jsonl"), *ONE_SHOT, "--sample", "100000"])
    assert read(tmp_path / "all.jsonl") == survivors  # asking for more than there are keeps them all


def test_sample_is_uniform():
    """Each of 10 items lands in a sample of 3 with probability 0.3 (binomial sd over 4000 seeds: 0.007)."""
    hits = [0] * 10
    for seed in range(4000):
        sample, keys = Sample(3), random.Random(seed)
        for item in range(10):
            sample.offer(keys.random(), item, item)
        assert sample.in_order() == sorted(sample.in_order())
        for item in sample.in_order():
            hits[item] += 1
    assert all(abs(h / 4000 - 0.3) < 0.03 for h in hits), hits


@pytest.mark.parametrize("layout", ["lines", "array", "pretty"])
def test_parallel_blocks_give_the_sequential_result(tmp_path, monkeypatch, layout):
    """Blocks on two processes: same records, counts, bad-record lines and duplicates as one record at a time;
    the sample does not depend on how many processes ran."""
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4096)  # many blocks
    records = list(messy_text_records(400, seed=2))
    records[7] = {"input_text": 5, "target_text": "x"}  # a wrong type, skipped and reported
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    source = tmp_path / ("in.jsonl" if layout == "lines" else "in.json")
    text = {"lines": "\n".join(lines) + "\n", "array": "[\n" + ",\n".join(lines) + "\n]\n",
            "pretty": json.dumps(records, ensure_ascii=False, indent=2)}[layout]
    source.write_text(text, encoding="utf-8")
    assert blocks.line_layout(source).kind == ("lines" if layout == "lines" else "array")
    options = PrepareOptions(require=["input_text", "target_text"], rename=RENAME, char_count="n", dedup=[],
                             skip_bad=True)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.jsonl"
        report = prepare(source, out, options, workers=workers)
        results[workers] = (read(out), dict(report.counts), report.bad.examples)
        sampled = prepare(source, tmp_path / f"s{workers}.jsonl", PrepareOptions(sample=25, seed=4), workers=workers)
        assert sampled.counts["written"] == 25
    monkeypatch.setattr(blocks, "line_layout", lambda path: None)  # force the one-record-at-a-time reader
    report = prepare(source, tmp_path / "seq.jsonl", options)
    assert results[1] == results[2] == (read(tmp_path / "seq.jsonl"), dict(report.counts), report.bad.examples)
    field_line = next(i for i, row in enumerate(text.splitlines(), 1) if '"input_text": 5' in row)
    line = field_line - 1 if layout == "pretty" else field_line  # where the record's "{" is
    assert report.counts["dedup"] > 0 and f"line {line}:" in report.bad.examples[0]
    assert read(tmp_path / "s1.jsonl") == read(tmp_path / "s2.jsonl")


@pytest.mark.parametrize("text, records", [
    ('[\n{"a": "x"},\n{\n  "a": "y"\n},\n{"a": "z"}\n]\n', [{"a": "x"}, {"a": "y"}, {"a": "z"}]),  # mixed layout
    ('[\n{"a":\n{"b": 1},\n"c": 2},\n{"d": 3}\n]\n', [{"a": {"b": 1}, "c": 2}, {"d": 3}]),  # a nested "{" at column 0
    ("[\n]\n", []),
])
def test_arrays_that_do_not_split_cleanly_read_in_full(tmp_path, text, records):
    source = tmp_path / "odd.json"
    source.write_text(text)
    prepare(source, tmp_path / "out.jsonl", PrepareOptions(), workers=1)
    assert read(tmp_path / "out.jsonl") == records


def test_a_malformed_array_gets_the_sequential_readers_error(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text('[\n{"a": "x"},\n{"a": "y"}\n{"a": "z"}\n]\n')  # a missing comma
    with pytest.raises(TunesmithError, match="line 4: expected ',' or ']'"):
        prepare(source, tmp_path / "out.jsonl", PrepareOptions())


def test_steps_by_hand(tmp_path):
    """jq semantics written out: 0/false pass --require, "" and null do not; code points; dedup keeps the first."""
    source = tmp_path / "in.jsonl"
    rows = [{"a": "😀中x", "b": 0}, {"a": "", "b": 1}, {"b": 2}, {"a": None, "b": 3}, {"a": "ab", "b": False},
            {"a": "😀中x", "b": 0}]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    prepare(source, out, PrepareOptions(require=["a", "b"], char_count="n", count_fields=["a"], dedup=[]))
    assert read(out) == [{"a": "😀中x", "b": 0, "n": 3}, {"a": "ab", "b": False, "n": 2}]
    report = prepare(source, out, PrepareOptions(count_fields=["a"], min_chars=1, max_chars=3))
    assert read(out) == [{"a": "ab", "b": False}]  # 1 <= chars < 3; null and missing count 0
    assert report.counts["read"] == 6 and report.counts["chars"] == 5 and report.counts["written"] == 1


def test_token_counts_use_the_tokenizer(tmp_path, tokenizer, capsys):
    """The library takes the tokenizer's loader from its caller; the CLI brings tunesmith's own."""
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    source = tmp_path / "in.jsonl"
    texts = ["Eat a balanced diet.", "The quick brown fox jumps over the lazy dog. " * 5]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out = tmp_path / "out.jsonl"
    prepare(source, out, PrepareOptions(tokenizer=str(tokenizer_dir), load_tokenizer=AutoTokenizer.from_pretrained,
                                        token_count="tokens", max_tokens=lengths[1]))
    assert read(out) == [{"text": texts[0], "tokens": lengths[0]}]
    with pytest.raises(TunesmithError, match="a way to load the tokenizer"):
        prepare(source, out, PrepareOptions(tokenizer=str(tokenizer_dir), token_count="tokens"))
    cli_out = tmp_path / "cli.jsonl"
    args = ["data", "prepare", str(source), "-o", str(cli_out), "--tokenizer", str(tokenizer_dir)]
    assert main(args + ["--token-count", "tokens", "--max-tokens", str(lengths[1])]) == 0
    assert read(cli_out) == read(out)
    assert main(["data", "stats", str(source), "--tokenizer", str(tokenizer_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]["total"] == sum(lengths)


def test_bad_records_stop_the_run_by_default_and_are_counted_when_skipped(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"q": "a", "r": "b"}\n{"q": "a"\n{"q": 5, "r": "c"}\n{"r": "d"}\n{"q": "e", "r": "f"}\n')
    before = source.read_bytes()
    out = tmp_path / "out.jsonl"
    args = ["data", "prepare", str(source), "-o", str(out), "--rename", "q:prompt,r:response", "--char-count", "n"]
    assert main(args) == 2
    assert "in.jsonl: line 2: invalid JSON" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    assert main(args + ["--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "line 3: field 'prompt' is a JSON number, not text" in err  # wrong type
    assert "line 4: --rename names field 'q', which this record lacks" in err  # missing field
    assert "bad 3 (skipped)" in err
    assert read(out) == [{"prompt": "a", "response": "b", "n": 2}, {"prompt": "e", "response": "f", "n": 2}]
    assert source.read_bytes() == before  # the input is never modified


def test_output_may_not_overwrite_the_input(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "b"}\n')
    with pytest.raises(TunesmithError, match="overwrite the input"):
        prepare(source, source, PrepareOptions())


def test_formats_convert_both_ways(demo, tmp_path):
    """JSON array -> JSONL -> parquet -> CSV -> JSON array keeps the records (CSV keeps text as text)."""
    prepare(demo, tmp_path / "a.jsonl", PrepareOptions(require=["input_text", "target_text"], rename=RENAME))
    prepare(tmp_path / "a.jsonl", tmp_path / "b.parquet", PrepareOptions())
    prepare(tmp_path / "b.parquet", tmp_path / "c.csv", PrepareOptions())
    prepare(tmp_path / "c.csv", tmp_path / "d.json", PrepareOptions())
    records = read(tmp_path / "a.jsonl")
    assert read(tmp_path / "b.parquet") == records == read(tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text(encoding="utf-8")) == records


def test_stats_prints_percentiles_and_a_histogram(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"t": "x" * n}) + "\n" for n in range(1, 101)))
    assert main(["data", "stats", str(source), "--json"]) == 0
    chars = json.loads(capsys.readouterr().out)["chars"]
    assert chars["total"] == 5050 and chars["min"] == 1 and chars["max"] == 100 and chars["p50"] == 50.5
    assert chars["p90"] == pytest.approx(90.1)  # numpy's linear interpolation: 1 + 0.9 * 99
    assert main(["data", "stats", str(source), "--bins", "4"]) == 0
    table = capsys.readouterr().out
    assert "100 records" in table and table.count("#") > 0 and "25" in table.splitlines()[-1]


def test_a_bad_option_fails_once_before_any_worker_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 256)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"t": "x" * 50}) + "\n" for _ in range(50)))
    with pytest.raises(TunesmithError, match="token counts need a tokenizer"):
        prepare(source, tmp_path / "out.jsonl", PrepareOptions(max_tokens=10), workers=2)
    with pytest.raises(TunesmithError, match="--sample -1: must be 0 or more"):
        prepare(source, tmp_path / "out.jsonl", PrepareOptions(sample=-1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("content, reason", [
    (b'[\n{"a": "\xff"}\n]\n', "not UTF-8"),
    (b'{"a": "\xff"}\n', "not UTF-8"),
    (b'{"a": ' + b"[" * 100000 + b"\n", "invalid JSON"),
    (b'{"a": 1' + b"0" * 5000 + b"}\n", "invalid JSON"),
])
def test_unreadable_input_is_a_located_error_not_a_traceback(tmp_path, content, reason):
    source = tmp_path / ("in.json" if content.startswith(b"[") else "in.jsonl")
    source.write_bytes(content)
    with pytest.raises(TunesmithError, match=reason):
        prepare(source, tmp_path / "out.jsonl", PrepareOptions())


def test_output_paths_are_checked_before_anything_is_written(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "b"}\n')
    with pytest.raises(TunesmithError, match="is a folder"):
        prepare(source, _folder(tmp_path), PrepareOptions())
    with pytest.raises(TunesmithError, match="cannot write there"):
        prepare(source, source / "x.jsonl", PrepareOptions())
    with pytest.raises(TunesmithError, match="file not found"):
        prepare(tmp_path / "missing.jsonl", tmp_path / "new" / "out.jsonl", PrepareOptions())
    assert not (tmp_path / "new").exists()


def _folder(tmp_path):
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    return folder


def test_lone_surrogates_and_huge_integers_pass_through(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "x\\ud800y", "n": 123456789012345678901234567890}\n')
    prepare(source, tmp_path / "out.jsonl", PrepareOptions(dedup=[]))
    assert read(tmp_path / "out.jsonl") == read(source)


def test_parquet_output_refuses_records_with_other_fields(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "x"}\n{"a": "y", "b": "z"}\n')
    with pytest.raises(TunesmithError, match="parquet needs the same fields"):
        prepare(source, tmp_path / "out.parquet", PrepareOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_csv_long_fields_multiline_records_and_extra_cells(tmp_path, capsys):
    source = tmp_path / "in.csv"
    long_text = "y" * 200_000
    source.write_text(f'a,n\n"two\nlines",1\n{long_text},2\nx,3,extra\nz,4\n')
    report = prepare(source, tmp_path / "out.jsonl", PrepareOptions(skip_bad=True))
    assert read(tmp_path / "out.jsonl") == [{"a": "two\nlines", "n": "1"}, {"a": long_text, "n": "2"},
                                            {"a": "z", "n": "4"}]
    assert report.bad.count == 1 and "line 5: the row has 1 more cell" in report.bad.examples[0]
    assert main(["data", "stats", str(source), "--field", "n", "--json", "--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["n"]["total"] == 7  # 1 + 2 + 4 (the bad row skipped), read from text


def test_pool_workers_die_at_once_on_sigterm(tmp_path):
    """Pool.terminate() kills workers with SIGTERM; one that kept the CLI's handler (which unwinds to
    remove temporary outputs) could die holding the pool's queue lock and hang the run."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        blocks.init_pool_worker(tmp_path / "x.jsonl", blocks.Layout("lines", 0), (make_pipeline, PrepareOptions()), None)
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_count_fields_must_survive_the_rename(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": "xyz"}\n')
    with pytest.raises(TunesmithError, match="--count-fields a: --rename/--select keep only b"):
        prepare(source, tmp_path / "out.jsonl", PrepareOptions(rename=[("a", "b")], count_fields=["a"], max_chars=2))
