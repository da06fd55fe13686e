#!/usr/bin/env bash
# LLaMA-Factory 0.9.5 in its own venv (../lf_venv), and the model and data tunesmith's bench_train uses,
# so that benchmarks/llamafactory/time_lf.py measures the same work on the same machine. Run from the
# repository root with tunesmith's venv built (make test). Then:
#   ../lf_venv/bin/python benchmarks/llamafactory/time_lf.py --steps 13        # 3 warm-up + 10 timed
#   .venv/bin/python benchmarks/bench_train.py --model saves/lf_bench/model --dataset bench --dataset-dir saves/lf_bench/data --steps 10 --warmup 3
# LLaMA-Factory's default is gradient checkpointing on; add `disable_gradient_checkpointing: true` to
# lf_sft.yaml to compare against tunesmith's default (off).
set -euo pipefail
VENV=../lf_venv
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0                       # CPU build first, as for tunesmith
"$VENV/bin/pip" install -q llamafactory==0.9.5 torch==2.13.0
# pip pulls CUDA builds of torchvision/torchaudio that do not load against the CPU torch; LLaMA-Factory
# imports torchaudio unconditionally but uses it only for audio inputs, so a stub stands in for it.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/torchaudio"
printf '"""Stub: no audio in a text-only benchmark."""\n__version__ = "0.0.0+stub"\n' > "$site/torchaudio/__init__.py"
.venv/bin/tunesmith init-model saves/lf_bench/model --size 40m
.venv/bin/python - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_train import synthetic_dataset
from transformers import AutoTokenizer
synthetic_dataset(Path("saves/lf_bench/data"), AutoTokenizer.from_pretrained("saves/lf_bench/model"), 200, 0)
PY
