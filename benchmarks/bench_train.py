"""Training throughput and memory: non-pad tokens/s, peak RSS and MFU against this machine's measured matmul peak.

    python benchmarks/bench_train.py --init 40m                       # SFT, 40M Qwen2-shaped model, LoRA r8
    python benchmarks/bench_train.py --init 40m --stage dpo           # DPO on 4 pairs per batch (chosen + rejected counted)
    python benchmarks/bench_train.py --init 40m --stage dpo --precompute-ref-logprobs
    python benchmarks/bench_train.py --init 40m --stage rm            # reward model
    python benchmarks/bench_train.py --init 40m --stage kto           # KTO: 4 answers + 4 mismatched per batch
    python benchmarks/bench_train.py --init 40m --bf16
    python benchmarks/bench_train.py --init 40m --quantization-bit 4   # QLoRA (benchmarks/bench_qlora.py compares)
    python benchmarks/bench_train.py --init qwen2-0.5b --tokenizer ../shared/assets/qwen2_tokenizer --steps 3
    python benchmarks/bench_train.py --model path/to/hf_folder --dataset alpaca_en_demo --dataset-dir data

It runs the real training path (config -> model -> data -> the shared loop). Without --dataset it
writes a synthetic alpaca set with prompts of 10-60 tokens and responses of 20-400 tokens (for rm and
dpo, chosen and rejected answers of 20-400 tokens each). The first `--warmup` steps are run and
discarded (allocator and kernel warm-up), then `--steps` steps are timed. A batch is
`--batch-size` samples for sft and that many pairs (twice as many sequences) for rm and dpo.
MFU counts 2 FLOPs per weight of every Linear layer the step runs (forward), plus as much again for
the input-gradient half of backward when the base is frozen, or twice as much for full fine-tuning;
dpo adds a reference forward unless it is precomputed; rm never runs the lm_head. tokens/s counts
chosen and rejected sequences in full; MFU counts the tokens actually run (a pair's prompt runs once).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.algorithms.linear import linear
from tunesmith.data.pairs import shared_prefix_length
from tunesmith.model.loading import load_tokenizer
from tunesmith.training import loop
from tunesmith.training.configure import build_config
from tunesmith.training.run import prepare_training
from tunesmith.training.stages import STAGES, StageInputs
from tunesmith.training.updates import Updates


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 15) -> float:
    """Best-of-N FLOP/s of a square matmul through tunesmith's own (`algorithms.linear`: oneDNN where it
    beats torch's BLAS): the machine's practical peak for this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        linear(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synthetic_dataset(folder: Path, tokenizer, n_records: int, seed: int, pairs: bool = False, kto: bool = False) -> None:
    """Alpaca records, prompts of 10-60 tokens and answers of 20-400 tokens (measured in this tokenizer);
    with `kto`, each labelled desirable or not at random."""
    rng = random.Random(seed)
    corpus = (Path(__file__).resolve().parents[1] / "src/tunesmith/resources/corpus.txt").read_text().split()

    def text_of(n_tokens: int) -> str:
        start = rng.randrange(0, len(corpus) - 2 * n_tokens)
        ids = tokenizer(" ".join(corpus[start:start + 2 * n_tokens]), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:n_tokens])

    answers = ("chosen", "rejected") if pairs else ("output",)
    records = [{"instruction": text_of(rng.randint(10, 60)), "input": "",
                **{key: text_of(rng.randint(20, 400)) for key in answers}} for _ in range(n_records)]
    if kto:
        records = [{**record, "label": rng.random() < 0.5} for record in records]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(records))
    entry = {"file_name": "bench.json", "ranking": pairs, **({"columns": {"kto_tag": "label"}} if kto else {})}
    (folder / "dataset_info.json").write_text(json.dumps({"bench": entry}))


def flops_per_token(model, stage: str, finetuning_type: str, precomputed_reference: bool) -> int:
    """FLOPs per token of one training step (see the module docstring)."""
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if stage == "rm":
        linear -= head.weight.numel()
    passes = 3 if finetuning_type == "full" else 2  # forward + input grads (+ weight grads)
    if stage in ("dpo", "kto") and not precomputed_reference:
        passes += 1
    return 2 * passes * linear


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model folder")
    parser.add_argument("--init", help="instead of --model: build a random-init model of this size preset")
    parser.add_argument("--tokenizer", help="with --init: copy this tokenizer folder")
    parser.add_argument("--dataset", help="dataset name or file (default: synthetic)")
    parser.add_argument("--dataset-dir", default="data")
    parser.add_argument("--stage", default="sft", choices=["sft", "rm", "dpo", "kto"])
    parser.add_argument("--precompute-ref-logprobs", action="store_true", help="dpo: cache reference log-probs first")
    parser.add_argument("--finetuning-type", default="lora", choices=["lora", "full", "freeze"])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--quantization-bit", type=int, choices=[4, 8], help="QLoRA: the base in 4 or 8 bits (bitsandbytes)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tunesmith_bench_"))
    model_path = args.model or _init_in_subprocess(work / "model", args.init, args.tokenizer)
    tokenizer = load_tokenizer(model_path)
    dataset, dataset_dir = args.dataset, args.dataset_dir
    if dataset is None:
        n_records = args.batch_size * (args.steps + args.warmup) * 2
        synthetic_dataset(work / "data", tokenizer, n_records, seed=0, pairs=args.stage in ("rm", "dpo"),
                          kto=args.stage == "kto")
        dataset, dataset_dir = "bench", str(work / "data")
    config = build_config({
        "stage": args.stage, **({"precompute_ref_logprobs": args.precompute_ref_logprobs} if args.stage == "dpo" else {}),
        "model_name_or_path": model_path, "dataset": dataset, "dataset_dir": dataset_dir,
        "finetuning_type": args.finetuning_type, "lora_rank": args.lora_rank, "lora_target": "all",
        "quantization_bit": args.quantization_bit,
        "template": "qwen", "cutoff_len": args.cutoff_len, "packing": args.packing, "bf16": args.bf16,
        "per_device_train_batch_size": args.batch_size, "learning_rate": 1e-4, "save_steps": 0,
        "gradient_checkpointing": args.gradient_checkpointing, "output_dir": str(work / "out"),
    })
    run = prepare_training(config)  # exactly what `tunesmith train` does before its loop
    config, device, model = run.config, run.device, run.model
    (work / "out").mkdir()
    spec, stage = STAGES[config.stage], run.stage
    for steps in (args.warmup, args.steps):  # the first call warms up; the second is timed
        config.train.max_steps = config.output.logging_steps = steps
        config.output.log_rollouts_steps = 0  # the training step alone, without the board's sample logs
        if not args.precompute_ref_logprobs:  # DPO caches reference log-probs: time a first epoch's steps
            stage = spec.build(StageInputs(model, config, run.tokenizer, run.data, device, run.reference))
        metrics = loop.train(model, stage, run.data, config.train, config.output, lambda folder, state: None,
                         Updates(model, config.train, device))
    params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model, args.stage, config.adapter.finetuning_type, args.precompute_ref_logprobs)
    computed = 1.0  # share of the counted tokens actually run: a pair's prompt runs once for both answers
    if args.stage != "sft":
        counted = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in run.data.train)
        computed = 1 - sum(shared_prefix_length(r) for r in run.data.train) / counted
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048, 4096)  # big enough to saturate each device
    peak = max(matmul_peak_flops(torch.bfloat16 if args.bf16 else torch.float32, device, n) for n in sizes)
    result = {
        "stage": args.stage, "model": model_path, "params": params, "device": str(device), "dtype": str(run.compute_dtype),
        "finetuning_type": config.adapter.finetuning_type, "quantization_bit": args.quantization_bit,
        "batch_size": args.batch_size, "cutoff_len": args.cutoff_len,
        "packing": args.packing, "threads": torch.get_num_threads(),
        "tokens_per_second": metrics["tokens_per_second"],
        "peak_rss_gb": round(_peak_rss_bytes() / 1e9, 3),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.type == "cuda" else None,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "computed_token_share": round(computed, 3),
        "mfu": round(metrics["tokens_per_second"] * computed * flops / peak, 3),
    }
    print(json.dumps(result, indent=2))
    return result


def _init_in_subprocess(folder: Path, size: str, tokenizer: str | None) -> str:
    """Build the model in another process, so its memory does not count in this one's peak RSS."""
    command = [sys.executable, "-m", "tunesmith.cli", "init-model", str(folder), "--size", size]
    subprocess.run(command + (["--tokenizer", tokenizer] if tokenizer else []), check=True, capture_output=True)
    return str(folder)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
