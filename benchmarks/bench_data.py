"""The data-cleaning chain: `tunesmith data prepare` + `stats` against the textbook's jq commands.

    python benchmarks/bench_data.py                      # 1,000,000 records (about 0.8 GB), jq if installed
    python benchmarks/bench_data.py --records 100000 --layout pretty

It writes demo.json (records from `messy_text_records`: nulls, empties, missing fields, Chinese,
emoji, 2% long texts, 3% duplicates) as a JSON array, one record per line (`--layout lines`, as
`jq -c` writes) or indented (`--layout pretty`, as json.dump(indent=2) writes), then times

    jq -c '.[]' | jq select(non-empty) | jq {prompt, response} | jq .char_cnt = ... | jq select(< 4096)
      | shuf | head -n 10000 ; jq '.char_cnt // 0' | awk sum
    tunesmith data prepare demo.json -o out.jsonl --require ... --sample 10000 ; tunesmith data stats --field char_cnt

each as the shell runs them (process start-up included), and checks the outputs agree: tunesmith
without --sample writes exactly jq's records before `shuf`, its sample is 10,000 of them, and stats
totals the sample's char_cnt. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunesmith.data.streams import read_stream
from tunesmith.demos.synthetic import messy_text_records

PREPARE = ["--require", "input_text,target_text", "--rename", "input_text:prompt,target_text:response",
           "--char-count", "char_cnt", "--max-chars", "4096"]
JQ_CHAIN = """set -e
jq -c '.[]' demo.json > demo_new.jsonl
jq -c 'select(.input_text != null and .input_text != "" and .target_text != null and .target_text != "")' demo_new.jsonl > s2.jsonl
jq -c '{prompt: .input_text, response: .target_text}' s2.jsonl > s3.jsonl
jq -c '. | .char_cnt = ((.prompt | length) + (.response | length) | floor)' s3.jsonl > s4.jsonl
jq -c 'select(.char_cnt < 4096)' s4.jsonl > s5.jsonl
shuf s5.jsonl | head -n 10000 > s6.jsonl
jq -c ".char_cnt // 0" s6.jsonl | awk '{s+=$1} END {print s}'
"""


def write_demo(path: Path, records: int, layout: str, seed: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i, record in enumerate(messy_text_records(records, seed=seed)):
            text = json.dumps(record, ensure_ascii=False, indent=2 if layout == "pretty" else None)
            f.write(("" if i == 0 else ",\n") + ("  " + text.replace("\n", "\n  ") if layout == "pretty" else text))
        f.write("\n]\n")


def timed(command, folder: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, shell=isinstance(command, str), check=True, capture_output=True,
                          text=True, executable="/bin/bash" if isinstance(command, str) else None)
    return time.perf_counter() - start, done.stdout


def records_of(path: Path) -> list:
    return [record for _, record in read_stream(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--layout", choices=["lines", "pretty"], default="lines")
    parser.add_argument("--dir", default="saves/bench_data", help="work folder (the demo file is reused if present)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    demo = folder / "demo.json"
    stamp = folder / "demo.args"
    wanted = f"{args.records} {args.layout} {args.seed}"
    if not demo.exists() or not stamp.exists() or stamp.read_text() != wanted:
        start = time.perf_counter()
        write_demo(demo, args.records, args.layout, args.seed)
        stamp.write_text(wanted)
        print(f"wrote {demo} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    tunesmith = str(Path(sys.executable).with_name("tunesmith"))

    result = {"records": args.records, "layout": args.layout, "file_mb": round(demo.stat().st_size / 1e6, 1)}
    prepare_s, _ = timed([tunesmith, "data", "prepare", "demo.json", "-o", "ts_sample.jsonl", *PREPARE,
                          "--sample", "10000", "--seed", "0"], folder)
    stats_s, stats_out = timed([tunesmith, "data", "stats", "ts_sample.jsonl", "--field", "char_cnt", "--json"], folder)
    result.update(tunesmith_s=round(prepare_s + stats_s, 2), tunesmith_prepare_s=round(prepare_s, 2),
                  tunesmith_stats_s=round(stats_s, 2),
                  tunesmith_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
    stats = json.loads(stats_out)
    sample = records_of(folder / "ts_sample.jsonl")
    assert len(sample) == 10000 == stats["records"]
    assert stats["char_cnt"]["total"] == sum(r["char_cnt"] for r in sample)
    result["tunesmith_char_cnt_total"] = stats["char_cnt"]["total"]

    if shutil.which("jq") is None:
        result["jq"] = "not installed (apt-get install jq)"
    else:
        jq_s, jq_total = timed(JQ_CHAIN, folder)
        result.update(jq_s=round(jq_s, 2), speedup=round(jq_s / (prepare_s + stats_s), 1),
                      jq_char_cnt_total=int(jq_total.strip()))
        full_s, _ = timed([tunesmith, "data", "prepare", "demo.json", "-o", "ts_all.jsonl", *PREPARE], folder)
        survivors = records_of(folder / "s5.jsonl")
        result["same_records_as_jq_before_shuf"] = records_of(folder / "ts_all.jsonl") == survivors
        remaining = iter(survivors)
        result["sample_is_a_subsequence_of_jq_records"] = all(any(r == o for o in remaining) for r in sample)
        result["tunesmith_without_sample_s"] = round(full_s, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
