#!/usr/bin/env bash
# On a CUDA machine: the test suite, then SFT/DPO/RM throughput for the 40M shape (fp32 and bf16) and
# SFT for the Qwen2-0.5B shape (bf16). Usage: benchmarks/gpu_check.sh [qwen2_tokenizer_dir]
# Needs the package's dependencies (pip install -e .); tests/data also needs orjson.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -p no:cacheprovider -p no:warnings -rfE tests 2>&1 | grep -vE "it/s|^$" | tail -15
bench() { timeout 120 python3 benchmarks/bench_train.py "$@" 2>&1 | grep -E '"(tokens_per_second|peak_rss_gb|peak_gpu_memory_gb|matmul_peak_gflops|mfu|dtype|packing)"' | tr -d '\n '; echo; }
echo "40m lora fp32:";        bench --init 40m --steps 20 --warmup 3
echo "40m lora bf16:";        bench --init 40m --steps 20 --warmup 3 --bf16
echo "40m lora bf16 packed:"; bench --init 40m --steps 20 --warmup 3 --bf16 --packing
echo "40m dpo bf16:";         bench --init 40m --steps 20 --warmup 3 --bf16 --stage dpo
echo "40m rm bf16:";          bench --init 40m --steps 20 --warmup 3 --bf16 --stage rm
if [ -n "${1:-}" ]; then echo "qwen2-0.5b lora bf16:"; bench --init qwen2-0.5b --tokenizer "$1" --steps 10 --warmup 2 --bf16; fi
