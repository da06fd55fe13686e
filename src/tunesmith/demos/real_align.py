"""`tunesmith demo-real --align`: DPO, GRPO and PPO each measurably change a real model's behaviour.

The behaviour is one SmolLM2-135M-Instruct never shows: answering entirely in lowercase (checked by rule:
the answer has letters and none is uppercase). Everything trains LoRA adapters on 48 everyday and factual
prompts (`ANCHORS`) and is measured on 16 held-out prompts (greedy answers), plus the SFT demo's simple
questions as a share of what the base answered correctly:
- DPO, from the base, on pairs built from the base model's own sampled answers: chosen = the answer
  lowercased (it passes the rule), rejected = the answer as sampled;
- SFT on the base's own answers with a quarter of them lowercased: the weak starting policy of the RL
  methods. From the base, RL cannot start: of 384 sampled answers 2 were lowercase, both gibberish, so a
  rule reward has nothing to reinforce. The SFT model answers greedily in lowercase no more often than the
  base but samples a lowercase answer now and then, which is all RL needs;
- GRPO from the SFT model, rewarded by rule (`lowercase_reward`): lowercase, plus, on the factual
  training prompts, the expected word (lowercasing otherwise teaches the model to dodge capitalised
  names, "the capital of france is france");
- PPO from the SFT model, rewarded by a reward model trained (`stage: rm`) on the DPO pairs.
Each RL method is judged against its own starting point, the SFT model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tunesmith.demos.real_demo import ANCHORS, SIMPLE_QUESTIONS, answer_prompts, is_correct, smollm2_gguf
from tunesmith.model.adapters import apply_adapters
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.sampling.generate import SamplingSettings
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
# the expected words of ANCHORS' 24 factual questions, in order ("|" separates accepted words)
FACTS = ["lisbon", "oslo", "delhi", "canberra", "mexico city", "warsaw", "red", "black", "blue", "orange",
         "three|3", "sixty|60", "eight|8", "two|2", "nine|9", "five|5", "ten|10", "earth", "carbon dioxide|co2",
         "blue whale", "down", "ice", "water", "leonardo|da vinci"]
COMMON = {"finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_target": "q_proj,k_proj,v_proj,o_proj",
          "cutoff_len": 192, "logging_steps": 5, "save_steps": 0, "overwrite_output_dir": True, "seed": 0}
RL = {"dataset": "align_prompts", "adapter_name_or_path": "sft", "max_new_tokens": 32, "temperature": 1.0,
      "ppo_epochs": 1, "lr_scheduler_type": "constant"}
# training order; "adapter_name_or_path" / "reward_model" name earlier stages
STAGES = {
    # DPO, measured (held-out lowercase, simple-question score vs the base), beta 0.1 unless said: lr 5e-4
    # 40 steps 75% / 52%, lr 3e-4 40 steps 75% / 84%, 35 steps 56% / 88%, 32 steps 38% / 92%, 30 steps
    # 19% / 112%; beta 0.25 lr 5e-4 40 steps 81% / 72%; beta 0.15 lr 3e-4 35 steps 56% / 92% (this one)
    "dpo": {"stage": "dpo", "dataset": "lowercase_pairs", "per_device_train_batch_size": 4, "learning_rate": 3e-4,
            "pref_beta": 0.15, "max_steps": 35},
    "sft": {"stage": "sft", "dataset": "quarter_lowercase", "per_device_train_batch_size": 4, "learning_rate": 3e-4,
            "max_steps": 24, "lr_scheduler_type": "constant"},
    # GRPO from sft, measured as above: lr 3e-4 12 steps 25% / 92%, 16 steps 56% / 96% (this one), 20 steps
    # 81% / 84%; without FACTS in the reward: 20 steps on the 24 open prompts 81% / 80%, lr 5e-4 beta 0.04
    # 30 steps 94% / 36% ("the capital of france is france")
    "grpo": {**RL, "stage": "grpo", "reward_function": "tunesmith.demos.real_align:lowercase_reward",
             "per_device_train_batch_size": 4, "num_generations": 8, "learning_rate": 3e-4, "ppo_kl_coef": 0.2,
             "max_steps": 16},
    "rm": {"stage": "rm", "dataset": "lowercase_pairs", "adapter_name_or_path": "sft", "per_device_train_batch_size": 8,
           "learning_rate": 5e-4, "max_steps": 30},
    # PPO from sft, lr 3e-4 beta 0.2, 8 prompts a step: 12 steps 31% / 92% (12% / 88% once decoding on
    # packed weights rounded differently: too close to the edge), 14 steps 38% / 72%, 16 steps 62% / 84%,
    # 20 steps 75% / 68%; beta 0.4 16 steps 31% / 80%; lr 1.5e-4 20 steps 0% / 112%. 16 prompts a step: 12
    # steps 25% / 92%, 16 steps 50% / 92% (this one; the same with TUNESMITH_PACK=off; on an AMD EPYC VM
    # 56% / 84% with oneDNN's GEMM, 31% / 76% with BLAS's; adaptive KL there, ppo_target 1.5 horizon 32:
    # 69% / 92% and 56% / 88%, ppo_target 1.0: 38% / 60% and 44% / 76%). The reward
    # model values lowercase only, so PPO's answers drift (the capital of japan "iskyo"); an RM also
    # trained on pairs preferring the right fact (both lowercase) kept 104% but taught less: 8 prompts 12
    # steps 6%, 20 steps 44% / 72%; 16 prompts 12 steps 12%. GRPO's reward checks the facts itself.
    "ppo": {**RL, "stage": "ppo", "reward_model": "rm", "per_device_train_batch_size": 16, "learning_rate": 3e-4,
            "ppo_epochs": 2, "ppo_kl_coef": 0.2, "max_steps": 16},
}
STARTS = {"dpo": "base", "sft": "base", "grpo": "sft", "ppo": "sft"}  # the measured models and where each began


def is_lowercase(text: str) -> bool:
    """The rule: at least one letter, and no uppercase letter."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.isupper() for c in letters)


def lowercase_reward(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """GRPO's reward (`reward_function: tunesmith.demos.real_align:lowercase_reward`): the share of lowercase
    letters (0 without letters), +1 when the rule passes, +1 when the prompt has a reference ("lisbon",
    "three|3") and one of its words is in the answer."""
    rewards = []
    for completion, reference in zip(completions, references):
        letters = [c for c in completion if c.isalpha()]
        share = sum(c.islower() for c in letters) / len(letters) if letters else 0.0
        knows = bool(reference) and is_correct(completion, reference.split("|"))
        rewards.append(share + float(is_lowercase(completion)) + float(knows))
    return rewards


def sampled_pairs(model, tokenizer, prompts: list[str], samples: int = 2, seed: int = 0) -> list[dict]:
    """Alpaca ranking records from the model's own sampled answers: chosen lowercased, rejected as sampled."""
    torch.manual_seed(seed)
    answers = answer_prompts(model, tokenizer, prompts, 64, SamplingSettings(max_new_tokens=64, temperature=0.8), samples)
    records = []
    for row, answer in enumerate(answers):
        if answer and not is_lowercase(answer):
            records.append({"instruction": prompts[row // samples], "input": "", "chosen": answer.lower(),
                            "rejected": answer})
    return records


def quarter_lowercased(prompts: list[str], answers: list[str], seed: int = 0) -> list[dict]:
    """Alpaca SFT records of the base's own answers, a random quarter of them lowercased."""
    lowered = set(random.Random(seed).sample(range(len(prompts)), len(prompts) // 4))
    return [{"instruction": p, "input": "", "output": a.lower() if i in lowered else a}
            for i, (p, a) in enumerate(zip(prompts, answers)) if a]


def write_data(data: Path, base, tokenizer) -> int:
    """The DPO/RM pairs, the warm-start SFT set and the RL prompts (with FACTS as references) in `data`;
    returns the number of pairs."""
    data.mkdir(parents=True, exist_ok=True)
    pairs = sampled_pairs(base, tokenizer, ANCHORS)
    references = [""] * (len(ANCHORS) - len(FACTS)) + FACTS
    files = {"lowercase_pairs": pairs,
             "quarter_lowercase": quarter_lowercased(ANCHORS, answer_prompts(base, tokenizer, ANCHORS, 64)),
             "align_prompts": [{"instruction": p, "input": "", "output": r} for p, r in zip(ANCHORS, references)]}
    for name, records in files.items():
        (data / f"{name}.json").write_text(json.dumps(records, indent=1))
    (data / "dataset_info.json").write_text(json.dumps(
        {name: {"file_name": f"{name}.json", **({"ranking": True} if name == "lowercase_pairs" else {})}
         for name in files}, indent=1))
    return len(pairs)


def measure(model, tokenizer) -> dict:
    held_out = answer_prompts(model, tokenizer, HELD_OUT, 48)
    simple = answer_prompts(model, tokenizer, [q for q, _ in SIMPLE_QUESTIONS], 40)
    return {"answers": held_out, "pass": sum(map(is_lowercase, held_out)) / len(HELD_OUT),
            "simple_ok": [is_correct(a, words) for a, (_, words) in zip(simple, SIMPLE_QUESTIONS)]}


def stages_for(methods: tuple[str, ...]) -> list[str]:
    """The stages `methods` need, earlier stages they build on included, in training order."""
    needed, queue = set(), list(methods)
    while queue:
        name = queue.pop()
        needed.add(name)
        queue += [STAGES[name][key] for key in ("adapter_name_or_path", "reward_model") if key in STAGES[name]]
    return [name for name in STAGES if name in needed]


def train_stage(name: str, root: Path, source: str, say: Callable[[str], None]) -> list[str]:
    """Write `root/name.yaml`, run it as `tunesmith train` does; returns the adapters of the trained model."""
    settings = {**COMMON, **STAGES[name], "model_name_or_path": source, "dataset_dir": str(root / "data"),
                "output_dir": str(root / name)}
    for key in ("adapter_name_or_path", "reward_model"):
        if key in settings:
            settings[key] = str(root / settings[key])
    (root / f"{name}.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    say(f"[demo-real] tunesmith train {root / f'{name}.yaml'}")
    run_training(load_config(str(root / f"{name}.yaml")), say=say)
    start = [settings["adapter_name_or_path"]] if "adapter_name_or_path" in settings else []
    return start + [str(root / name)]


def run_align_demo(output_dir: str = "demo_real_align", say: Callable[[str], None] = print,
                   methods: tuple[str, ...] = ("dpo", "grpo", "ppo")) -> dict:
    """Base measurement, then each stage trained and each measured model measured the same way; returns
    the table's numbers (also in results.json)."""
    root = Path(output_dir)
    source = str(smollm2_gguf())
    tokenizer = load_tokenizer(source)
    base = load_model(source, torch.float32, torch.device("cpu"))
    rows = {"base": measure(base, tokenizer)}
    pairs = write_data(root / "data", base, tokenizer)
    del base
    for name in stages_for(methods):
        adapters = train_stage(name, root, source, say)
        if name in STARTS:
            model = load_model(source, torch.float32, torch.device("cpu"))
            apply_adapters(model, adapters, trainable_last=False)
            rows[name] = measure(model, tokenizer)
    known = sum(rows["base"]["simple_ok"])
    table = {name: {"started_from": STARTS.get(name), "lowercase": row["pass"],
                    "gain": row["pass"] - rows[STARTS[name]]["pass"] if name in STARTS else None,
                    "simple_vs_base": sum(row["simple_ok"]) / max(known, 1), "example": row["answers"][0]}
             for name, row in rows.items()}
    report = _report(table)
    (root / "results.md").write_text(report)
    (root / "results.json").write_text(json.dumps({"table": table, "rows": rows, "pairs": pairs}, indent=1))
    say(report)
    return table


def _report(table: dict) -> str:
    lines = ["| model | started from | held-out answers entirely lowercase | gain over its start | "
             "simple questions, vs the base |", "|---|---|---|---|---|"]
    for name, row in table.items():
        gain = f"{row['gain'] * 100:+.0f} points" if row["gain"] is not None else ""
        lines.append(f"| {name} | {row['started_from'] or ''} | {row['lowercase']:.0%} | {gain} | "
                     f"{row['simple_vs_base']:.0%} |")
    lines += ["", f"Held-out prompt: {HELD_OUT[0]}"]
    lines += [f"- {name}: {' '.join(row['example'].split())}" for name, row in table.items()]
    return "\n".join(lines) + "\n"
