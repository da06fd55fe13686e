#!/usr/bin/env bash
# On a CUDA machine: the RL tests, decode paths (CUDA graph / eager / transformers), PPO/GRPO step times on the 40M model (bf16) and the demo-rlhf scores.
# Usage: bash benchmarks/gpu_rl_check.sh   (needs the package's dependencies, orjson included)
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 -m pytest -p no:cacheprovider -p no:warnings -rfE -q tests/algorithms tests/inference tests/model/test_lora.py tests/training/test_rl.py -k "not demo" 2>&1 | grep -vE "it/s|^$" | tail -12
echo "== decode"; timeout 90 python3 benchmarks/bench_decode.py 2>&1 | grep '^{'
timeout 90 python3 benchmarks/bench_decode.py --dtype bf16 --lora 2>&1 | grep '^{'
echo "== bench ppo"; timeout 90 python3 benchmarks/bench_rl.py --steps 4 2>&1 | grep -E '"(seconds_per_step|tokens_per_second|mean_response_length|device)"' | tr -d '\n '; echo
echo "== bench ppo, rollouts in bf16 with TIS"; timeout 90 python3 benchmarks/bench_rl.py --steps 4 --set rollout_dtype=bf16 --set rollout_is_cap=2 2>&1 | grep -E '"(seconds_per_step|time/generation|time/scoring|time/update)"' | tr -d '\n '; echo
echo "== bench ppo, rollouts on the decode scheduler"; timeout 90 python3 benchmarks/bench_rl.py --steps 4 --set rollout_engine=true 2>&1 | grep -E '"(seconds_per_step|time/generation|time/scoring|time/update)"' | tr -d '\n '; echo
echo "== bench grpo"; timeout 90 python3 benchmarks/bench_rl.py --stage grpo --prompts 2 --generations 4 --steps 4 2>&1 | grep -E '"(seconds_per_step|tokens_per_second|mean_response_length|device)"' | tr -d '\n '; echo
echo "== demo"; timeout 200 python3 -c "
from tunesmith.demos.rlhf_demo import run_rl_demo
print(run_rl_demo('/tmp/demo_rlhf', say=lambda *a: None))" 2>&1 | tail -3
