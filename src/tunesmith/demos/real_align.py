"""`tunesmith demo-real --align`: alignment that measurably changes a real model's behaviour.

The behaviour is one SmolLM2-135M-Instruct almost never shows: answering entirely in lowercase (checked by
rule: the answer has letters and none is uppercase). Starting from the base model, each method trains a
LoRA adapter on 48 everyday prompts and is measured on 16 held-out prompts (greedy answers):
- DPO on pairs built from the base model's own sampled answers: chosen = the answer lowercased (it passes
  the rule), rejected = the answer as sampled;
- GRPO with the rule as reward (the share of an answer's letters that are lowercase, so partly lowercase
  answers already earn something).
Both also report the simple questions of the SFT demo, as a share of what the base answered correctly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tunesmith.data.templates import get_template
from tunesmith.demos.real_demo import ANCHORS, SIMPLE_QUESTIONS, answer_prompts, is_correct, smollm2_gguf
from tunesmith.model.adapters import apply_adapters
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.sampling.generate import SamplingSettings, generate
from tunesmith.training.configure import load_config
from tunesmith.training.run import run_training

HELD_OUT = [
    "Give me a tip for learning a new language.", "Describe a sunny beach in one sentence.",
    "How do I clean a window?", "Suggest a healthy snack.", "Write one sentence about mountains.",
    "What is a good way to relax after work?", "Describe a dog in one sentence.", "How can I make new friends?",
    "Give me an idea for a birthday gift.", "Write a short sentence about winter.", "How do I water a plant?",
    "Suggest a name for a bakery.", "What should I do on a rainy afternoon?", "Describe the stars at night.",
    "Give me a tip for cooking rice.", "Write a short greeting for a new neighbour.",
]
COMMON = {"finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_target": "q_proj,k_proj,v_proj,o_proj",
          "cutoff_len": 192, "logging_steps": 5, "save_steps": 0, "overwrite_output_dir": True, "seed": 0}
METHODS = {
    # measured (held-out lowercase share, simple-question score vs the base), beta 0.1 unless said: lr 5e-4
    # 40 steps 75% / 52%, lr 3e-4 40 steps 75% / 84%, 35 steps 56% / 88%, 32 steps 38% / 92%, 30 steps
    # 19% / 112%; beta 0.25 lr 5e-4 40 steps 81% / 72%; beta 0.15 lr 3e-4 35 steps 56% / 92% (this one)
    "dpo": {"stage": "dpo", "dataset": "lowercase_pairs", "per_device_train_batch_size": 4, "learning_rate": 3e-4,
            "pref_beta": 0.15, "max_steps": 35},
    "grpo": {"stage": "grpo", "dataset": "align_prompts", "reward_function": "tunesmith.demos.real_align:lowercase_reward",
             "per_device_train_batch_size": 4, "num_generations": 4, "max_new_tokens": 32, "learning_rate": 5e-4,
             "temperature": 1.0, "ppo_epochs": 1, "max_steps": 30, "lr_scheduler_type": "constant"},
}


def is_lowercase(text: str) -> bool:
    """The rule: at least one letter, and no uppercase letter."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.isupper() for c in letters)


def lowercase_reward(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """GRPO's reward (`reward_function: tunesmith.demos.real_align:lowercase_reward`): the share of lowercase
    letters in the answer (0 without letters), 1.0 exactly when the rule passes."""
    rewards = []
    for completion in completions:
        letters = [c for c in completion if c.isalpha()]
        rewards.append(sum(c.islower() for c in letters) / len(letters) if letters else 0.0)
    return rewards


def sampled_pairs(model, tokenizer, prompts: list[str], samples: int = 2, seed: int = 0) -> list[dict]:
    """Alpaca ranking records from the model's own sampled answers: chosen lowercased, rejected as sampled."""
    template = get_template(None, tokenizer)
    ids = [template.encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    torch.manual_seed(seed)
    with torch.no_grad():
        done = generate(model.eval(), ids, SamplingSettings(max_new_tokens=64, temperature=0.8),
                        template.stop_token_ids(tokenizer), tokenizer.pad_token_id, num_samples=samples)
    records = []
    for row, response in enumerate(done.response_ids):
        answer = tokenizer.decode(response, skip_special_tokens=True).strip()
        if answer and not is_lowercase(answer):
            records.append({"instruction": prompts[row // samples], "input": "", "chosen": answer.lower(),
                            "rejected": answer})
    return records


def measure(model, tokenizer) -> dict:
    held_out = answer_prompts(model, tokenizer, HELD_OUT, 48)
    simple = answer_prompts(model, tokenizer, [q for q, _ in SIMPLE_QUESTIONS], 40)
    return {"answers": held_out, "pass": sum(map(is_lowercase, held_out)) / len(HELD_OUT),
            "simple_ok": [is_correct(a, words) for a, (_, words) in zip(simple, SIMPLE_QUESTIONS)]}


def run_align_demo(output_dir: str = "demo_real_align", say: Callable[[str], None] = print,
                   methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """Base measurement, then each method from the base, measured the same way; returns the table's numbers."""
    root = Path(output_dir)
    source = str(smollm2_gguf())
    tokenizer = load_tokenizer(source)
    base = load_model(source, torch.float32, torch.device("cpu"))
    before = measure(base, tokenizer)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pairs = sampled_pairs(base, tokenizer, ANCHORS)
    (data / "lowercase_pairs.json").write_text(json.dumps(pairs, indent=1))
    (data / "align_prompts.json").write_text(json.dumps([{"instruction": p, "input": "", "output": ""} for p in ANCHORS]))
    (data / "dataset_info.json").write_text(json.dumps({
        "lowercase_pairs": {"file_name": "lowercase_pairs.json", "ranking": True},
        "align_prompts": {"file_name": "align_prompts.json"}}))
    del base
    rows = {"base": before}
    for name in methods:
        settings = {**COMMON, **METHODS[name], "model_name_or_path": source, "dataset_dir": str(data),
                    "output_dir": str(root / name)}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        say(f"[demo-real] tunesmith train {root / f'{name}.yaml'}")
        run_training(load_config(str(root / f"{name}.yaml")), say=say)
        model = load_model(source, torch.float32, torch.device("cpu"))
        apply_adapters(model, [str(root / name)], trainable_last=False)
        rows[name] = measure(model, tokenizer)
    known = sum(before["simple_ok"])
    table = {name: {"lowercase": row["pass"], "simple_vs_base": sum(row["simple_ok"]) / max(known, 1),
                    "example": row["answers"][0]} for name, row in rows.items()}
    lines = ["| model | held-out answers entirely lowercase | simple questions, vs the base |", "|---|---|---|"]
    lines += [f"| {name} | {row['lowercase']:.0%} | {row['simple_vs_base']:.0%} |" for name, row in table.items()]
    lines += ["", f"Held-out prompt: {HELD_OUT[0]}"] + [f"- {name}: {row['example']}" for name, row in table.items()]
    report = "\n".join(lines) + "\n"
    (root / "results.md").write_text(report)
    (root / "results.json").write_text(json.dumps({"table": table, "rows": rows, "pairs": len(pairs)}, indent=1))
    say(report)
    return table
