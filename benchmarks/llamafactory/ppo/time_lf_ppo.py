"""Seconds per PPO step of LLaMA-Factory 0.9.3 (trl 0.9.6) on the CPU, steps after the warm-up.

    bash benchmarks/llamafactory/ppo/setup.sh                 # once: ../lf093_venv and saves/lf_ppo
    ../lf093_venv/bin/python benchmarks/llamafactory/ppo/time_lf_ppo.py --steps 6 --no-amp
    .venv/bin/python benchmarks/bench_rl.py --model saves/lf_ppo/model --reward-model saves/lf_ppo/rm \
        --dataset saves/lf_ppo/data/prompts.json --steps 5   # tunesmith on the same model, reward model, prompts

Runs LLaMA-Factory's own training entry point (`llamafactory.train.tuner.run_exp`) in-process on
saves/lf_ppo/ppo.yaml (max_steps overridden by --steps), with LLaMA-Factory's CustomPPOTrainer methods
wrapped by time.perf_counter:
  gen    = CustomPPOTrainer.get_inputs  (sampling the responses, model.generate)
  reward = CustomPPOTrainer.get_rewards (reward LoRA + value head forward)
  ppo    = trl PPOTrainer.step          (ref/old logprobs + values, advantages, ppo_epochs of minibatch updates)
  step   = gen + reward + ppo           (the number reported)
  loop   = wall time between consecutive trainer steps (on_step_end to on_step_end; includes fetching the
           batch and LLaMA-Factory's own bookkeeping/logging; step 1 measured from on_train_begin)
The mean is over steps warmup+1..N. Nothing else in LLaMA-Factory or trl is changed, except with
--no-amp: LLaMA-Factory's PPO trainer wraps its forward passes (batched_forward_pass, get_rewards) in
torch.autocast(device.type), which on CPU means bfloat16 autocast; --no-amp replaces it by a null context
(fp32 throughout) for a comparison, and is off by default.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="saves/lf_ppo/ppo.yaml")
    parser.add_argument("--steps", type=int, default=6, help="total PPO steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the mean")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing on (LLaMA-Factory's default)")
    parser.add_argument("--no-amp", action="store_true", help="replace LF's CPU bf16 autocast by fp32")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) (diagnostic)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    import torch
    import yaml
    from llamafactory.train.ppo.trainer import CustomPPOTrainer
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback
    from trl import PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    lf_args = yaml.safe_load(Path(args.config).read_text())
    lf_args["max_steps"] = args.steps
    lf_args["disable_gradient_checkpointing"] = not args.gc

    cur: dict = {}
    steps: list[dict] = []

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            out = fn(self, *a, **k)
            cur[name] = cur.get(name, 0.0) + time.perf_counter() - t0
            if name == "gen":
                queries, responses = out
                cur.setdefault("query_lens", []).extend(len(q) for q in queries)
                cur.setdefault("response_lens", []).extend(len(r) for r in responses)
            return out
        return wrapper

    CustomPPOTrainer.get_inputs = timed("gen", CustomPPOTrainer.get_inputs)
    CustomPPOTrainer.get_rewards = timed("reward", CustomPPOTrainer.get_rewards)
    CustomPPOTrainer.step = timed("ppo", PPOTrainer.step)  # CustomPPOTrainer does not override step

    if args.no_amp:
        original_init = CustomPPOTrainer.__init__

        def init_without_amp(self, *a, **k):
            original_init(self, *a, **k)
            self.amp_context = contextlib.nullcontext()

        CustomPPOTrainer.__init__ = init_without_amp

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last = None

        def on_train_begin(self, args_, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            now = time.perf_counter()
            rec = {"step": state.global_step, "gen": cur.get("gen", 0.0), "reward": cur.get("reward", 0.0),
                   "ppo": cur.get("ppo", 0.0), "loop": now - self.last,
                   "query_lens": cur.get("query_lens", []), "response_lens": cur.get("response_lens", [])}
            rec["step_s"] = rec["gen"] + rec["reward"] + rec["ppo"]
            steps.append(rec)
            cur.clear()
            self.last = now
            print(f"PPO_STEP {rec['step']}: step_s={rec['step_s']:.3f} (gen {rec['gen']:.3f} + reward "
                  f"{rec['reward']:.3f} + trl_step {rec['ppo']:.3f}) loop_s={rec['loop']:.3f} "
                  f"response_lens={rec['response_lens']} query_lens={rec['query_lens']}", flush=True)

    wall0 = time.perf_counter()
    run_exp(lf_args, callbacks=[StepTimer()])
    wall = time.perf_counter() - wall0

    if len(steps) != args.steps:
        raise SystemExit(f"expected {args.steps} steps, saw {len(steps)}")
    timed_steps = steps[args.warmup:]

    def mean(key):
        return round(sum(s[key] for s in timed_steps) / len(timed_steps), 3)

    import accelerate
    import llamafactory
    import peft
    import transformers
    import trl
    response_lens = [n for s in timed_steps for n in s["response_lens"]]
    result = {
        "framework": f"llamafactory {llamafactory.__version__} + trl {trl.__version__}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
        "device": "cpu", "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gc, "cpu_bf16_autocast": not args.no_amp,
        "flush_denormal": args.flush_denormal,
        "prompts_per_step": lf_args["per_device_train_batch_size"], "max_new_tokens": lf_args["max_new_tokens"],
        "steps_total": args.steps, "warmup_steps": args.warmup, "timed_steps": len(timed_steps),
        "mean_response_length": round(sum(response_lens) / len(response_lens), 1),
        "seconds_per_step": mean("step_s"),
        "seconds_gen": mean("gen"), "seconds_reward": mean("reward"), "seconds_trl_step": mean("ppo"),
        "seconds_loop": mean("loop"),
        "per_step_s": [round(s["step_s"], 3) for s in steps],
        "per_step_loop_s": [round(s["loop"], 3) for s in steps],
        "run_exp_wall_s": round(wall, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    print("TIME_PPO_RESULT " + json.dumps(result), flush=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
