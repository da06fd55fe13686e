"""Seconds per GRPO step of TRL's GRPOTrainer (no vLLM, CPU, fp32), split into generation, scoring and update.

    .venv/bin/python benchmarks/trl_grpo/export_prompts.py     # once: saves/trl_grpo/{model,prompts.json,trl_prompts.jsonl}
    .venv/bin/python benchmarks/bench_rl.py --stage grpo --prompts 2 --generations 4 \
        --model saves/trl_grpo/model --dataset saves/trl_grpo/prompts.json --steps 3 --warmup 1 --threads 1
    ../lf_venv/bin/python benchmarks/trl_grpo/time_trl_grpo.py --prompts 2 --generations 4 --steps 3 --warmup 1 --threads 1

Run the two back to back on the same machine, with the same --threads (README's GRPO-against-TRL table
used 1: another job held the second core). The work is bench_rl.py's GRPO step: the same model
folder, the same prompt tokens in the same order (export_prompts.py renders them with tunesmith's
template; shuffle_dataset is off), `--prompts` prompts x `--generations` answers per step, at most 64 new
tokens (stopping at the tokenizer's EOS, which a random-init model almost never samples: see
mean_response_length), temperature 1, top_p 1, the same reward function (tunesmith's
`kindness_score`, imported from src/), LoRA r8 / alpha 16 / dropout 0 on every linear layer through
peft, beta 0.04 (tunesmith's grpo ppo_kl_coef default: so the reference, the policy with its adapter
off, runs), loss_type grpo, epsilon 0.2, one iteration per batch, gradient accumulation 1, lr 1e-5.
Gradient checkpointing is off as in tunesmith (TRL's GRPOConfig default is on, which would slow its
update). Versions: trl 0.24.0, transformers 5.6.0, peft 0.18.1, torch 2.13.0+cpu, in LLaMA-Factory
0.9.5's venv (../lf_venv). TRL 0.24 needs two fixes to run under transformers 5: fix_trl_availability,
and `model.warnings_issued` set before the trainer is built.

TRL times its phases only for wandb/mlflow, so GRPOTrainer's own methods are wrapped by perf_counter:
  generation = GRPOTrainer._generate_single_turn   (tokenising the prompts, model.generate)
  scoring    = GRPOTrainer._generate_and_score_completions - generation
               (reference log-probs with the adapter off, decoding, the reward, group advantages)
  update     = step - generate_and_score (forward with entropies, loss, backward, optimizer step)
  step       = on_step_begin to on_step_end of a TrainerCallback
The first --warmup steps are left out of the means.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
from tunesmith.demos.synthetic import kindness_score  # noqa: E402  (pure Python: no tunesmith dependency)


def kindness_reward(completions: list[str], **kwargs: object) -> list[float]:
    """bench_rl.py's reward (`tunesmith.demos.synthetic:kindness_reward`) in TRL's reward-function form."""
    return [kindness_score(completion) for completion in completions]


def fix_trl_availability() -> None:
    """TRL 0.24 reads transformers' `_is_package_available(name)` as a bool, but transformers 5 returns a
    (bool, version) tuple, so every optional package (mergekit, deepspeed, vllm, ...) reads as installed and
    importing GRPOTrainer fails on `import mergekit`. Keep each flag's bool, before any trainer is imported."""
    import trl.import_utils as flags

    for name, value in list(vars(flags).items()):
        if name.startswith("_") and name.endswith("_available") and isinstance(value, tuple):
            setattr(flags, name, value[0])


def wrap_timers(trainer_class: type, current: dict) -> None:
    """Add each call's seconds of generation and generate-and-score to `current` (and the answer lengths)."""
    def timed(name: str, method):  # noqa: ANN001, ANN202
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            start = time.perf_counter()
            out = method(self, *args, **kwargs)
            current[name] = current.get(name, 0.0) + time.perf_counter() - start
            if name == "generation":
                prompt_ids, completion_ids = out[0], out[1]
                current.setdefault("prompt_lengths", []).extend(len(ids) for ids in prompt_ids)
                current.setdefault("response_lengths", []).extend(len(ids) for ids in completion_ids)
            return out
        return wrapper

    trainer_class._generate_single_turn = timed("generation", trainer_class._generate_single_turn)
    trainer_class._generate_and_score_completions = timed("generate_and_score",
                                                          trainer_class._generate_and_score_completions)


def step_timer(current: dict, steps: list[dict]):  # noqa: ANN201
    """A TrainerCallback that closes each step's record: its seconds and the phases `current` collected."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            record = {"step": time.perf_counter() - current["start"], **current}
            record["scoring"] = record["generate_and_score"] - record["generation"]
            record["update"] = record["step"] - record["generate_and_score"]
            steps.append(record)
            print(f"TRL_GRPO_STEP {len(steps)}: {record['step']:.3f} s (generation {record['generation']:.3f}, "
                  f"scoring {record['scoring']:.3f}, update {record['update']:.3f}), response lengths "
                  f"{record['response_lengths']}", flush=True)

    return StepTimer()


def grpo_config(args: argparse.Namespace, output_dir: str):  # noqa: ANN201
    """TRL's GRPOConfig for bench_rl.py's GRPO step (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_prompt_length=512, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
        beta=0.04, epsilon=0.2, loss_type="grpo", scale_rewards="group", learning_rate=1e-5,
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, shuffle_dataset=False, seed=42,
        dataloader_num_workers=0, disable_tqdm=True,
    )


def run(args: argparse.Namespace) -> list[dict]:
    """Train args.warmup + args.steps GRPO steps with TRL; the per-step records."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix_trl_availability()
    from trl import GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    current: dict = {}
    steps: list[dict] = []
    wrap_timers(GRPOTrainer, current)
    records = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.warnings_issued = {}  # TRL 0.24 writes to it; transformers 5 models no longer have it
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as tmp:
        trainer = GRPOTrainer(model=model, reward_funcs=kindness_reward, args=grpo_config(args, tmp),
                              train_dataset=Dataset.from_list(records),
                              processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
                              callbacks=[step_timer(current, steps)])
        trainer.train()
    if len(steps) != args.warmup + args.steps:
        raise SystemExit(f"expected {args.warmup + args.steps} steps, saw {len(steps)}")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="saves/trl_grpo/model")
    parser.add_argument("--dataset", default="saves/trl_grpo/trl_prompts.jsonl", help="export_prompts.py's output")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="answers per prompt (num_generations)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_completion_length")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    steps = run(args)
    timed = steps[args.warmup:]
    mean = lambda key: round(sum(s[key] for s in timed) / len(timed), 3)  # noqa: E731
    lengths = [n for s in timed for n in s["response_lengths"]]
    prompt_lengths = [n for s in timed for n in s["prompt_lengths"]]

    import peft
    import torch
    import transformers
    import trl
    print(json.dumps({
        "framework": f"trl {trl.__version__} GRPOTrainer",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "model": args.model, "prompts_per_step": args.prompts, "num_generations": args.generations,
        "new_tokens": args.new_tokens, "device": "cpu", "threads": torch.get_num_threads(),
        "timed_steps": len(timed), "mean_prompt_length": round(sum(prompt_lengths) / len(prompt_lengths), 1),
        "mean_response_length": round(sum(lengths) / len(lengths), 1),
        "seconds_per_step": mean("step"),
        **{f"time/{phase}": mean(phase) for phase in ("generation", "scoring", "update")},
        "per_step_s": [round(s["step"], 3) for s in steps],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
