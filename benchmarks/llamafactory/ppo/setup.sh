#!/usr/bin/env bash
# LLaMA-Factory 0.9.3 + trl 0.9.6 (the versions issue 4 compares against) in ../lf093_venv, and the work
# bench_rl.py times: a 40M Qwen2-shaped model, a LoRA reward model with a value head on it, 64 prompts.
# Run from the repository root with tunesmith's venv built (make test). Then see time_lf_ppo.py.
set -euo pipefail
VENV=../lf093_venv
OUT=saves/lf_ppo
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0                      # the CPU build first, as for tunesmith
# pyarrow<21: newer pyarrow needs numpy 2, which llamafactory 0.9.3 pins below.
"$VENV/bin/pip" install -q llamafactory==0.9.3 trl==0.9.6 torch==2.13.0 "pyarrow<21"
.venv/bin/python - <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_rl import make_reward_adapter, prompt_records
from tunesmith.model.init_model import init_model
root = Path("saves/lf_ppo")
model = init_model(root / "model", arch="qwen2", size="40m", seed=0)
make_reward_adapter(model, root / "rm", rank=8)
(root / "data").mkdir(parents=True, exist_ok=True)
(root / "data" / "prompts.json").write_text(json.dumps(prompt_records(64, seed=0)))
(root / "data" / "dataset_info.json").write_text(json.dumps({"prompts": {"file_name": "prompts.json"}}))
# transformers 4.52 (what llamafactory 0.9.3 takes) reads an older config/tokenizer layout: the same
# weights and vocabulary, two files rewritten (logits checked identical across the two versions).
lf = root / "model_lf"
lf.mkdir(exist_ok=True)
for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
    if (root / "model" / name).exists() and not (lf / name).exists():
        (lf / name).symlink_to((root / "model" / name).resolve())
config = json.loads((root / "model" / "config.json").read_text())
config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
config.setdefault("torch_dtype", config.get("dtype", "float32"))
(lf / "config.json").write_text(json.dumps(config, indent=2))
tok = json.loads((root / "model" / "tokenizer_config.json").read_text())
tok.pop("backend", None)
tok["tokenizer_class"] = "PreTrainedTokenizerFast"
if isinstance(tok.get("extra_special_tokens"), list):
    tok["additional_special_tokens"] = tok.pop("extra_special_tokens")
(lf / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
PY
sed -e "s|@OUT@|$PWD/$OUT|g" benchmarks/llamafactory/ppo/lf_ppo.yaml > "$OUT/ppo.yaml"
