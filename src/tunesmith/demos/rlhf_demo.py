"""`tunesmith demo-rlhf`: SFT -> reward model -> PPO, plus GRPO, DPO, KTO and variants, on a laptop CPU, no download.

The task has a checkable answer: "Describe the X." should be answered with kind words only
(`kindness_score` in synthetic.py checks it). The SFT demonstrations are poor on purpose: only 30%
of them are kind, so supervised fine-tuning teaches the answer's format and, mostly, the wrong manner.
Then, each starting from the SFT model (its adapter merged, so it is also the reference):
- a reward model is trained on pairs (kind answer chosen, unkind rejected), and PPO optimises it;
- GRPO optimises the rule-based reward directly (`reward_function`);
- DPO learns from the same pairs (with pref_ftx, an SFT term on the chosen answer that keeps plain DPO
  from lowering the chosen answers' likelihood along with the rejected ones'), and KTO from them unpaired;
- the variants: DAPO and Dr. GRPO (GRPO's loss types), RLOO and REINFORCE++ (critic-free PPO on the
  reward model).
The pairs' rejected answers include broken ones ("The river."): without them the reward model never
learns that an answer with no description is bad, and PPO finds exactly that hack.
Each method is scored on held-out things the training data never mentions: the share of sampled
answers (temperature 1) that are entirely kind. Every stage runs through `tunesmith train`'s own
`run_training` from a YAML file the demo writes, so the YAMLs are the recipe to copy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tunesmith.data.templates import get_template
from tunesmith.demos.synthetic import THINGS, kindness_score, noisy_description_records, preference_records
from tunesmith.model.adapters import apply_adapters
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.sampling.generate import SamplingSettings, generate
from tunesmith.training.configure import load_config
from tunesmith.training.run import run_training

HELD_OUT_THINGS = THINGS[-4:]
TRAIN_THINGS = THINGS[:-4]
COMMON = {"finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all", "cutoff_len": 128,
          "logging_steps": 10, "save_steps": 0, "overwrite_output_dir": True, "seed": 0, "plot_loss": True}
# stage -> (its settings, optimizer steps at scale 1)
STAGES = {
    "sft": ({"stage": "sft", "dataset": "noisy_descriptions", "per_device_train_batch_size": 8, "learning_rate": 3e-3,
             "lr_scheduler_type": "cosine"}, 150),
    "rm": ({"stage": "rm", "dataset": "kindness_pairs", "adapter_name_or_path": "sft", "per_device_train_batch_size": 8,
            "learning_rate": 2e-3}, 80),
    "ppo": ({"stage": "ppo", "dataset": "noisy_descriptions", "adapter_name_or_path": "sft", "reward_model": "rm",
             "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_new_tokens": 16, "ppo_epochs": 2,
             "ppo_kl_coef": 0.2, "lr_scheduler_type": "constant"}, 40),
    "grpo": ({"stage": "grpo", "dataset": "noisy_descriptions", "adapter_name_or_path": "sft",
              "reward_function": "tunesmith.demos.synthetic:kindness_reward", "per_device_train_batch_size": 4,
              "num_generations": 4, "learning_rate": 2e-3, "max_new_tokens": 16, "ppo_epochs": 2,
              "lr_scheduler_type": "constant"}, 40),
    "dpo": ({"stage": "dpo", "dataset": "kindness_pairs", "adapter_name_or_path": "sft", "per_device_train_batch_size": 8,
             "learning_rate": 1e-3, "pref_beta": 0.1, "pref_ftx": 1.0}, 60),
}
# the GRPO family and the critic-free PPO estimators, each a variation of the runs above
VARIANTS = {
    "dapo": ("grpo", {"loss_type": "dapo", "epsilon_high": 0.28, "drop_zero_std_groups": True}),
    "dr_grpo": ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    "kto": ("dpo", {"stage": "kto", "dataset": "kindness_kto"}),  # the same pairs, unpaired
    "rloo": ("ppo", {"advantage_estimator": "rloo", "num_generations": 4, "per_device_train_batch_size": 4}),
    # REINFORCE++ at PPO's 1e-3 ended anywhere from 0.20 to 0.66 kind on held-out prompts by float rounding
    # alone (which GEMM, packed or not); at GRPO's 2e-3, 0.88-1.0 under all four
    "reinforce_pp": ("ppo", {"advantage_estimator": "reinforce_pp", "learning_rate": 2e-3}),
}
STAGES.update({name: ({**STAGES[base][0], **changes}, STAGES[base][1]) for name, (base, changes) in VARIANTS.items()})
METHODS = ("ppo", "grpo", "dpo", *VARIANTS)


def write_data(data_dir: Path) -> None:
    """Write the noisy SFT demonstrations, the kindness pairs (also unpaired, for KTO) and their
    dataset_info.json to `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pairs = preference_records(400, seed=1, things=TRAIN_THINGS, degenerate_share=0.3, varied_share=0.5)
    files = {"noisy_descriptions": noisy_description_records(TRAIN_THINGS, 400, kind_share=0.3),
             "kindness_pairs": pairs,
             "kindness_kto": [{"instruction": pair["instruction"], "input": "", "output": pair[side], "label": side == "chosen"}
                              for pair in pairs for side in ("chosen", "rejected")]}
    extra = {"kindness_pairs": {"ranking": True}, "kindness_kto": {"columns": {"kto_tag": "label"}}}
    info = {}
    for name, records in files.items():
        (data_dir / f"{name}.json").write_text(json.dumps(records, indent=1))
        info[name] = {"file_name": f"{name}.json", **extra.get(name, {})}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))


@torch.no_grad()
def held_out_kindness(model_dir: Path, adapters: list[str], samples: int = 16, seed: int = 0) -> tuple[float, str]:
    """(share of sampled answers to held-out prompts that are entirely kind, one greedy answer)."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), torch.float32, torch.device("cpu"))
    if adapters:
        apply_adapters(model, adapters, trainable_last=False)
    model.eval()
    template = get_template(None, tokenizer)
    stop, pad = template.stop_token_ids(tokenizer), tokenizer.pad_token_id
    prompts = [template.encode_prompt(tokenizer, [{"role": "user", "content": f"Describe the {thing}."}])
               for thing in HELD_OUT_THINGS]
    torch.manual_seed(seed)
    sampled = generate(model, prompts, SamplingSettings(max_new_tokens=16), stop, pad, num_samples=samples)
    kind = [kindness_score(tokenizer.decode(r, skip_special_tokens=True)) == 1.0 for r in sampled.response_ids]
    greedy = generate(model, prompts[:1], SamplingSettings(max_new_tokens=16, do_sample=False), stop, pad)
    return sum(kind) / len(kind), tokenizer.decode(greedy.response_ids[0], skip_special_tokens=True).strip()


def run_rl_demo(output_dir: str = "demo_rlhf", scale: float = 1.0, say: Callable[[str], None] = print) -> dict:
    """Train every stage, then print and return the held-out kind-answer share of SFT and of each method."""
    root = Path(output_dir)
    model_dir = init_model(root / "model", arch="qwen2", size="small", seed=0)
    write_data(root / "data")
    say(f"[demo-rlhf] model {model_dir}; data in {root / 'data'}; held-out things: {', '.join(HELD_OUT_THINGS)}")
    seconds = {}
    for name, (settings, steps) in STAGES.items():
        settings = {**COMMON, **settings, "model_name_or_path": str(model_dir), "dataset_dir": str(root / "data"),
                    "output_dir": str(root / name), "max_steps": max(1, round(steps * scale))}
        for key in ("adapter_name_or_path", "reward_model"):
            if key in settings:
                settings[key] = str(root / settings[key])
        config_path = root / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        say(f"\n[demo-rlhf] tunesmith train {config_path}")
        start = time.perf_counter()
        run_training(load_config(config_path), say=say)
        seconds[name] = time.perf_counter() - start
    results = {"sft": held_out_kindness(model_dir, [str(root / "sft")])}
    for name in METHODS:
        results[name] = held_out_kindness(model_dir, [str(root / "sft"), str(root / name)])
    say("\n[demo-rlhf] held-out prompts: share of sampled answers that are entirely kind, training seconds "
        "(and a greedy answer)")
    for name, (share, example) in results.items():
        say(f"  {name:12s} {share:6.1%} {seconds[name]:6.1f} s   {example!r}")
    return {name: share for name, (share, _) in results.items()}
