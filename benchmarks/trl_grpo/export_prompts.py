"""Write the model and prompts that bench_rl.py's GRPO run uses, in a form TRL's GRPOTrainer reads.

    .venv/bin/python benchmarks/trl_grpo/export_prompts.py            # -> saves/trl_grpo/

Run with tunesmith's venv. It writes to --out:
  model/              the random-init 40M Qwen2-shaped model (`init_model`, seed 0), as bench_rl.py builds it
  prompts.json        bench_rl.py's 64 prompt records (`prompt_records(64, seed=0)`), for `bench_rl.py --dataset`
  trl_prompts.jsonl   the same prompts as tunesmith renders them (chat template, generation header), one
                      {"prompt": text} a line, in the order tunesmith's first epoch takes them (`epoch_order`
                      with the run's seed): TRL, with shuffle_dataset off, then gets the same prompts at each step
Each rendered prompt is checked to tokenize back to tunesmith's exact prompt ids, as TRL tokenizes it
(add_special_tokens=False), so both tools prefill the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_tokenizer
from tunesmith.training.configure import build_config
from tunesmith.training.loop import epoch_order
from tunesmith.training.rl import build_prompt_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_rl import prompt_records  # noqa: E402


def rendered_prompts(model_dir: Path, prompts: Path, new_tokens: int) -> list[str]:
    """tunesmith's prompt texts for a grpo run on `prompts`, in its first epoch's order."""
    config = build_config({"stage": "grpo", "model_name_or_path": str(model_dir), "dataset": str(prompts),
                           "output_dir": str(prompts.parent / "unused"), "lora_rank": 8, "lora_target": "all",
                           "cutoff_len": 512, "max_new_tokens": new_tokens,
                           "reward_function": "tunesmith.demos.synthetic:kindness_reward"})
    tokenizer = load_tokenizer(str(model_dir))
    rows = build_prompt_rows(config.data.dataset, config.data, new_tokens, tokenizer)
    texts = []
    for index in epoch_order(len(rows), config.train.seed, 0):
        ids = rows[index]["prompt_ids"]
        text = tokenizer.decode(ids)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != list(ids):
            raise SystemExit(f"prompt {index} does not tokenize back to tunesmith's ids: {text!r}")
        texts.append(text)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="saves/trl_grpo")
    parser.add_argument("--new-tokens", type=int, default=64, help="bench_rl.py's --new-tokens (bounds the prompt)")
    args = parser.parse_args()
    out = Path(args.out)
    if not (out / "model" / "config.json").exists():
        init_model(out / "model", arch="qwen2", size="40m", seed=0)
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(prompt_records(64, seed=0)))
    texts = rendered_prompts(out / "model", prompts.resolve(), args.new_tokens)
    (out / "trl_prompts.jsonl").write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    print(f"wrote {out / 'model'}, {prompts} and {len(texts)} prompts to {out / 'trl_prompts.jsonl'}")


if __name__ == "__main__":
    main()
