"""The `tunesmith` command. Subcommands only parse arguments and call library functions.

    tunesmith train cfg.yaml [key=value ...]   train as the YAML says (LLaMA-Factory's keys)
    tunesmith chat cfg.yaml [key=value ...]    talk to the model (base + adapters) in the terminal
    tunesmith export cfg.yaml [key=value ...]  merge the adapters into a plain Hugging Face model folder
    tunesmith api cfg.yaml [key=value ...]     serve the model with an OpenAI-compatible HTTP API
    tunesmith score RM_DIR [--prompt --response | --dataset]   score answers with a trained reward model
    tunesmith init-model OUT [--arch --size]   write a small random-init model folder, offline
    tunesmith demo                             build a tiny model, fine-tune it, show before/after
    tunesmith demo-rlhf                        SFT -> RM -> PPO, GRPO and DPO on a tiny model, held-out scores
    tunesmith demo-real                        LoRA SFT of the real SmolLM2-135M-Instruct: new identity, kept skills
    tunesmith data prepare|stats|convert|validate   clean, measure, convert and check data files
    tunesmith board [--root saves]             watch, compare, inspect and launch runs in the browser
    tunesmith report RUN_DIR                   one run as a self-contained report.html
    tunesmith env                              versions, device, threads
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.board.commands import add_board_commands
from tunesmith.demos.commands import add_demo_commands
from tunesmith.errors import STOPPED_EXIT_CODE, TrainingStopped, TunesmithError

if TYPE_CHECKING:
    pass


def _train(args: argparse.Namespace) -> int | None:
    from tunesmith.training.configure import config_help

    if args.help is not None:
        print(config_help(None if args.help == "all" else args.help))
        return 0
    if args.config is None:
        print("usage: tunesmith train cfg.yaml [key=value ...]   (tunesmith train --help [SECTION] lists the keys)",
              file=sys.stderr)
        return 2
    from tunesmith.training.launch import relaunch, torchrun_command

    command = torchrun_command(["train", args.config, *args.overrides], args.nproc)
    if command is not None:  # several processes: torchrun runs this command again on every rank
        # a config error is reported once, before any process starts (below, with the output folder)
        return relaunch(command, Path(_command_config(args, "train").output.output_dir))
    from tunesmith.inference.predict import train_and_predict
    from tunesmith.training.distributed import process_info

    config = _command_config(args, "train")
    metrics = train_and_predict(config)
    if process_info().is_main:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())
        print(f"[tunesmith] done: {summary}; outputs in {config.output.output_dir}")


def _command_config(args, command: str):
    from tunesmith.training.configure import load_config

    notices: list[str] = []
    config = load_config(args.config, args.overrides, notices, command=command)
    for notice in notices:
        print(notice, file=sys.stderr)
    return config


def _chat(args) -> None:
    from tunesmith.inference.chat import run_chat

    run_chat(_command_config(args, "chat"))


def _export(args) -> None:
    from tunesmith.inference.export import export_model

    export_model(_command_config(args, "export"))


def _api(args) -> None:
    import os

    from tunesmith.inference.server import run_api

    config = _command_config(args, "api")
    # LLaMA-Factory's environment variables, overridden by the config's keys
    host = config.inference.host or os.environ.get("API_HOST") or "127.0.0.1"
    port = config.inference.port
    if port is None:
        text = os.environ.get("API_PORT") or "8000"
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise TunesmithError(f"API_PORT={text!r} is not a port number (1-65535); fix it or set `port` in the config.")
        port = int(text)
    run_api(config, host, port, os.environ.get("API_KEY") or None)


def _score(args) -> None:
    import json

    from tunesmith.data.dataset import is_ranking_dataset, load_conversations, load_preference_examples
    from tunesmith.model.reward_model import RewardModel

    if (args.prompt is None) == (args.dataset is None) or (args.prompt is None) != (args.response is None):
        raise TunesmithError("score needs either --prompt and --response, or --dataset (names or files).")
    reward_model = RewardModel.load(args.reward_model, base_model=args.base_model)
    if args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": args.response}]
        print(json.dumps({"score": reward_model.score([messages])[0]}))
        return
    names = [name.strip() for name in args.dataset.split(",") if name.strip()]
    for name in names:
        if is_ranking_dataset(name, args.dataset_dir):
            pairs = load_preference_examples([name], args.dataset_dir, args.max_samples)
            chosen = reward_model.score([p.prompt_messages + [{"role": "assistant", "content": p.chosen}] for p in pairs])
            rejected = reward_model.score([p.prompt_messages + [{"role": "assistant", "content": p.rejected}] for p in pairs])
            for c, r in zip(chosen, rejected):
                print(json.dumps({"dataset": name, "chosen": c, "rejected": r}))
            accuracy = sum(c > r for c, r in zip(chosen, rejected)) / max(len(pairs), 1)
            print(f"[tunesmith] {name}: {len(pairs)} pairs, accuracy {accuracy:.4f} "
                  "(share of pairs where chosen scores higher)", file=sys.stderr)
        else:
            conversations = load_conversations([name], args.dataset_dir, args.max_samples)
            for value in reward_model.score(conversations):
                print(json.dumps({"dataset": name, "score": value}))


def _init_model(args) -> None:
    from tunesmith.model.init_model import init_model

    path = init_model(args.output_dir, arch=args.arch, size=args.size, seed=args.seed, tokenizer_dir=args.tokenizer)
    print(f"[tunesmith] wrote a random-init {args.arch} ({args.size}) model to {path}")


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _data_prepare(args) -> None:
    from tunesmith.datatools.prepare import PrepareOptions, parse_rename, prepare

    tokenizer_loader = None
    if args.tokenizer:  # lazily: torch and transformers only when a tokenizer is named
        from tunesmith.model.loading import load_tokenizer

        tokenizer_loader = load_tokenizer
    options = PrepareOptions(
        require=_names(args.require), rename=parse_rename(args.rename or ""), select=_names(args.select),
        char_count=args.char_count, count_fields=_names(args.count_fields), min_chars=args.min_chars,
        max_chars=args.max_chars, tokenizer=args.tokenizer, load_tokenizer=tokenizer_loader,
        token_count=args.token_count, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
        dedup=None if args.dedup is None else _names(args.dedup), sample=args.sample, seed=args.seed,
        skip_bad=args.skip_bad)
    report = prepare(args.input, args.output, options)
    for example in report.bad.examples:
        print(f"tunesmith: skipped bad record: {example}", file=sys.stderr)
    print(f"[tunesmith] {args.output}: {report.summary()}", file=sys.stderr)


def _data_stats(args) -> None:
    import json

    from tunesmith.data.streams import BadRecords
    from tunesmith.datatools.stats import collect, format_report

    if args.field and args.tokenizer:
        raise TunesmithError("stats: --tokenizer counts the tokens of text fields; it has no meaning with --field.")
    bad = BadRecords(args.file, args.skip_bad, writes=False)
    tokenizer = None
    if args.tokenizer:  # lazily: torch and transformers only when tokens are counted
        from tunesmith.model.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    records, columns = collect(bad, args.field, tokenizer)
    if args.json:
        print(json.dumps({"records": records, "bad": bad.count, **{c.name: c.summary() for c in columns}}))
    else:
        print(format_report(bad, records, columns, args.bins))


def _data_convert(args) -> None:
    from tunesmith.datatools.convert import convert_file

    bad = convert_file(args.input, args.output, args.to, args.source_format, args.skip_bad)
    for example in bad.examples:
        print(f"tunesmith: skipped bad record: {example}", file=sys.stderr)
    print(f"[tunesmith] wrote {args.output} ({args.to})" + (f"; {bad.count} bad records skipped" if bad.count else ""),
          file=sys.stderr)


def _data_validate(args) -> int:
    from tunesmith.datatools.convert import validate_dataset

    good, reports = validate_dataset(args.dataset, args.dataset_dir)
    for bad in reports:
        for example in bad.examples:
            print(example)
        if bad.count > len(bad.examples):
            print(f"{bad.path}: ... and {bad.count - len(bad.examples)} more bad records")
    total_bad = sum(bad.count for bad in reports)
    print(f"[tunesmith] {args.dataset}: {good} records read as training reads them, {total_bad} bad", file=sys.stderr)
    return 1 if total_bad else 0


CONVERT_FORMATS = ("alpaca", "sharegpt", "openai")  # convert.WRITERS' keys, without importing it


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="clean, measure, convert and check data files (json/jsonl/csv/parquet)")
    verbs = data.add_subparsers(dest="data_command", required=True, metavar="verb")

    prepare = verbs.add_parser(
        "prepare", help="filter, reshape, count, de-duplicate and sample records in one streaming pass",
        description="Steps run in this order, each optional: --require, --rename/--select, character count and "
        "filter, token count and filter, --dedup, --sample. Without --sample every surviving record is written, "
        "in input order. The output format follows its suffix and is written atomically.")
    prepare.add_argument("input", help=".json (array or JSON lines), .jsonl, .csv or .parquet")
    prepare.add_argument("-o", "--output", required=True, help="output file (.jsonl, .json, .csv or .parquet)")
    prepare.add_argument("--require", help="comma list: drop records where a field is missing, null or empty")
    prepare.add_argument("--rename", help="comma list of old:new; keeps only the renamed fields, in order")
    prepare.add_argument("--select", help="comma list: keep only these fields, in order (after --rename)")
    prepare.add_argument("--char-count", metavar="FIELD", help="add FIELD = characters (code points) of the counted fields")
    prepare.add_argument("--count-fields", help="comma list of fields to count (default: those --rename/--select "
                         "keep, else every text field)")
    prepare.add_argument("--min-chars", type=int, help="keep records with at least N characters")
    prepare.add_argument("--max-chars", type=int, help="keep records with fewer than N characters (jq: select(.n < N))")
    prepare.add_argument("--tokenizer", help="tokenizer or model folder for token counts")
    prepare.add_argument("--token-count", metavar="FIELD", help="add FIELD = tokens of the counted fields")
    prepare.add_argument("--min-tokens", type=int, help="keep records with at least N tokens")
    prepare.add_argument("--max-tokens", type=int, help="keep records with fewer than N tokens")
    prepare.add_argument("--dedup", nargs="?", const="", metavar="FIELDS",
                         help="drop exact duplicates (whole records, or equal values of these comma-listed fields)")
    prepare.add_argument("--sample", type=int, help="keep a uniform random sample of N records (reservoir)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    prepare.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    prepare.set_defaults(handler=_data_prepare)

    stats = verbs.add_parser("stats", help="record count, totals, percentiles and a histogram")
    stats.add_argument("file")
    stats.add_argument("--field", help="a numeric field to total (missing/null count 0, like jq's `.f // 0`)")
    stats.add_argument("--tokenizer", help="also count tokens of the text fields with this tokenizer")
    stats.add_argument("--bins", type=int, default=10, help="histogram bins (default 10)")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    stats.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    stats.set_defaults(handler=_data_stats)

    convert = verbs.add_parser("convert", help="rewrite records as alpaca, sharegpt or openai (messages) records")
    convert.add_argument("input")
    convert.add_argument("-o", "--output", required=True)
    convert.add_argument("--to", required=True, choices=CONVERT_FORMATS)
    convert.add_argument("--from", dest="source_format", default="auto", choices=("auto", *CONVERT_FORMATS))
    convert.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    convert.set_defaults(handler=_data_convert)

    validate = verbs.add_parser("validate", help="read a dataset as training would and list every bad record")
    validate.add_argument("dataset", help="a dataset_info.json name or a file path")
    validate.add_argument("--dataset-dir", default="data", help="folder with dataset_info.json (default: data)")
    validate.set_defaults(handler=_data_validate)


def _env(args) -> None:
    from tunesmith.env import environment_report

    print(environment_report())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; each sets `handler`, the function that runs it."""
    from tunesmith.model.sizes import SIZE_PRESETS

    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune and align language models from one YAML file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    train = commands.add_parser("train", help="train as a YAML config says (stage: sft | rm | dpo | ppo | grpo)",
                                add_help=False)
    train.add_argument("config", nargs="?", help="YAML file with LLaMA-Factory-style keys")
    train.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N processes of this machine (torchrun; same as NPROC_PER_NODE=N)")
    train.add_argument("-h", "--help", nargs="?", const="all", metavar="SECTION",
                       help="list every config key with its type, default and meaning (or one section's)")
    train.set_defaults(handler=_train)

    for name, handler, text in (("chat", _chat, "chat with the model in the terminal (streams tokens)"),
                                ("export", _export, "merge adapters into a Hugging Face model folder (export_dir)"),
                                ("api", _api, "serve an OpenAI-compatible API (API_HOST, API_PORT, API_KEY)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("config", help="YAML file: model_name_or_path, adapter_name_or_path, template, ...")
        sub.add_argument("overrides", nargs="*", help="key=value settings that override the file")
        sub.set_defaults(handler=handler)

    score = commands.add_parser("score", help="score answers with a reward model trained by `stage: rm`")
    score.add_argument("reward_model", help="output_dir (or checkpoint-N) of a `stage: rm` run")
    score.add_argument("--prompt", help="a user message (with --response)")
    score.add_argument("--response", help="the assistant answer to score")
    score.add_argument("--dataset", help="comma list of dataset names or files: one JSON line per record "
                       "(chosen and rejected scores for preference data, plus the accuracy)")
    score.add_argument("--dataset-dir", default="data", help="folder with dataset_info.json (default: data)")
    score.add_argument("--max-samples", type=int, default=None, help="score at most this many records per dataset")
    score.add_argument("--base-model", default=None, help="base model folder, if it moved since training")
    score.set_defaults(handler=_score)

    init = commands.add_parser("init-model", help="write a small random-init model folder (no download)")
    init.add_argument("output_dir")
    init.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    init.add_argument("--size", choices=sorted(SIZE_PRESETS), default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", default=None, help="copy this tokenizer folder instead of training one")
    init.set_defaults(handler=_init_model)

    add_demo_commands(commands)
    add_board_commands(commands)
    _add_data_commands(commands)

    env = commands.add_parser("env", help="print versions, device and threads")
    env.set_defaults(handler=_env)
    return parser


_library_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """tunesmith's warnings are meant for users (bf16 fallback, skipped records): one line, no source path."""
    if "tunesmith" in str(filename):
        print(f"tunesmith: warning: {message}", file=file or sys.stderr)
    else:
        _library_showwarning(message, category, filename, lineno, file, line)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds `with` blocks: temporary outputs are removed, as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run one command; a TunesmithError prints its message without a traceback. Returns the exit status."""
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; no torch import
    who = f" (rank {rank} of {world})" if world > 1 else ""
    try:
        status = args.handler(args)
    except TrainingStopped as stopped:
        if rank == 0:
            print(f"tunesmith: {stopped}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except TunesmithError as err:
        print(f"tunesmith: error{who}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if world == 1 or not _peer_failure(err):
            raise
        print(f"tunesmith: rank {rank} stopped because another rank failed ({type(err).__name__}); "
              "that rank's error is above.", file=sys.stderr)
        return 1
    return status or 0


def _peer_failure(err: Exception) -> bool:
    """Whether an exception is a collective failing because another rank went away."""
    text = f"{type(err).__name__} {err}".lower()
    return any(words in text for words in ("connection closed", "connection reset", "broken pipe",
                                           "closed by peer"))


if __name__ == "__main__":
    sys.exit(main())
