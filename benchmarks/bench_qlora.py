"""QLoRA against LoRA on the full-precision base: memory and tokens/s of LoRA SFT on the same model folder,
the same synthetic data and the same steps, each in its own process, side by side.

    python benchmarks/bench_qlora.py --init qwen2-0.5b --tokenizer ../shared/assets/qwen2_tokenizer
    python benchmarks/bench_qlora.py --init qwen2-0.5b --tokenizer ../shared/assets/qwen2_tokenizer --gradient-checkpointing
    python benchmarks/bench_qlora.py --model path/to/hf_folder --bits 4 8 --steps 4

Runs: fp32 LoRA (`quantization_bit` unset) and one per --bits (4: NF4 with double quantization, 8: int8).
Memory is read from /proc for two phases. Load: from start until the model is ready to train (VmHWM; its
file-backed part is the page cache of the memory-mapped safetensors file, which the kernel can drop at
will). Train: the high-water mark is reset (/proc/self/clear_refs), then --warmup + --steps optimizer steps
run; VmHWM then is the training peak, with RssAnon / RssFile at its end. An fp32 base is used in place
from the mapped file, so its weights count as file-backed while training; a quantized base holds its
weights in its own memory. Target: QLoRA 4-bit training peak <= 0.5x fp32 LoRA's.
tokens/s: the loop's own, over the timed steps after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def memory() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in GB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) * 1024 / 1e9, 3)
    return fields


def child(args: argparse.Namespace) -> dict:
    """One run in this process: load, reset the high-water mark, train; the numbers as JSON."""
    import torch

    from tunesmith.training import loop
    from tunesmith.training.configure import build_config
    from tunesmith.training.run import prepare_training
    from tunesmith.training.updates import Updates

    torch.set_num_threads(args.threads)
    settings = json.loads(args.child)
    run = prepare_training(build_config(settings))
    loaded = memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next peak is training's own
    config = run.config
    Path(config.output.output_dir).mkdir(parents=True, exist_ok=True)
    for steps in (args.warmup, args.steps):  # the first call warms up; the second is timed
        config.train.max_steps = config.output.logging_steps = steps
        metrics = loop.train(run.model, run.stage, run.data, config.train, config.output, lambda *_: None,
                             Updates(run.model, config.train, run.device))
    return {"load": loaded, "train": memory(), "tokens_per_second": metrics["tokens_per_second"]}


def name_of(bits: int | None) -> str:
    return f"{bits}-bit" if bits else "fp32"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model folder")
    parser.add_argument("--init", default="qwen2-0.5b", help="instead of --model: a random-init size preset")
    parser.add_argument("--tokenizer", help="with --init: copy this tokenizer folder")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every run (QLoRA's usual setting)")
    parser.add_argument("--out", help="also write the results here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    from bench_train import _init_in_subprocess, synthetic_dataset

    from tunesmith.model.loading import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="tunesmith_bench_qlora_"))
    model = args.model or _init_in_subprocess(work / "model", args.init, args.tokenizer)
    synthetic_dataset(work / "data", load_tokenizer(model), args.batch_size * (args.steps + args.warmup) * 2, seed=0)
    base = {"model_name_or_path": model, "dataset": "bench", "dataset_dir": str(work / "data"), "template": "qwen",
            "cutoff_len": args.cutoff_len, "per_device_train_batch_size": args.batch_size, "lora_rank": 8,
            "lora_target": "all", "learning_rate": 1e-4, "save_steps": 0, "output_dir": str(work / "out"),
            "gradient_checkpointing": args.gradient_checkpointing}
    results = {}
    for bits in [None, *args.bits]:
        settings = {**base, **({"quantization_bit": bits} if bits else {})}
        command = [sys.executable, __file__, "--child", json.dumps(settings), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name_of(bits)} run failed:\n{done.stderr[-3000:]}")
        results[name_of(bits)] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results["fp32"]
    print(f"LoRA SFT of {model}, batch {args.batch_size}, cutoff_len {args.cutoff_len}, {args.steps} timed steps, "
          f"{args.threads} threads, gradient_checkpointing {args.gradient_checkpointing}. GB:")
    print(f"{'base':8} {'load peak':>9} {'train peak':>10} {'anon':>6} {'file':>6} {'tokens/s':>8} {'peak / fp32':>11}")
    for name, r in results.items():
        ratio = r["train"]["VmHWM"] / reference["train"]["VmHWM"]
        print(f"{name:8} {r['load']['VmHWM']:9.3f} {r['train']['VmHWM']:10.3f} {r['train']['RssAnon']:6.3f} "
              f"{r['train']['RssFile']:6.3f} {r['tokens_per_second']:8.1f} {ratio:11.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
