"""Seconds per PPO (or GRPO) step and peak RSS, on the real training path.

    python benchmarks/bench_rl.py                      # 40M model, 4 prompts, 64 new tokens, 1 PPO epoch
    python benchmarks/bench_rl.py --stage grpo --prompts 2 --generations 4
    python benchmarks/bench_rl.py --estimator rloo --prompts 2 --generations 4   # critic-free PPO
    python benchmarks/bench_rl.py --stage grpo --prompts 2 --generations 4 --loss-type dapo
    python benchmarks/bench_rl.py --set rollout_engine=true    # rollouts on the decode scheduler
    python benchmarks/bench_rl.py --model saves/lf_ppo/model --reward-model saves/lf_ppo/rm --dataset saves/lf_ppo/data/prompts.json

It builds a random-init model (`--init`, default the 40M Qwen2 shape), a reward model as a LoRA adapter
on the same base (random adapter weights and value head, saved the way `stage: rm` saves one), and
prompts of 10-60 tokens, then runs `tunesmith train`'s `run_training`. Every response runs the full
`--new-tokens` unless it samples its end-of-turn token, which a random-init model almost never does (the
output reports the mean response length). The first `--warmup` steps are discarded; the rest are averaged
from trainer_log.jsonl's step_seconds.

MFU counts 2 FLOPs per weight per token for every pass the step runs, over the tokens it runs (prompt
and response; lm_head only where a log-prob is needed), against this machine's measured matmul peak:
sampling runs the prompts once and the response tokens one at a time; scoring runs the reference (with
lm_head over the responses; PPO, or GRPO with a KL term), for PPO the reward model (without), and
in bf16 the policy's own pass for pi_old (in fp32 the sampler's statistics are used);
the update runs forward and backward (input gradients only: LoRA's own are negligible), so 2x.
Decoding is memory-bound, so the sampling phase also reports the weight bytes it streamed per second.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from tunesmith.model.adapters import save_adapter
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.model.value_head import ValueHead, save_value_head
from tunesmith.training.configure import build_config
from tunesmith.training.run import run_training
from tunesmith.training.tracking import read_log

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import matmul_peak_flops  # noqa: E402


def make_reward_adapter(model_dir: Path, folder: Path, rank: int) -> None:
    """A LoRA reward model on `model_dir`: random (non-zero) adapter weights and value head."""
    model = load_model(str(model_dir), torch.float32, torch.device("cpu"))
    inject_lora(model, "all", rank, 2 * rank)
    torch.manual_seed(1)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.01)
    folder.mkdir(parents=True)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_modules(model)})
    save_adapter(model, folder, str(model_dir), rank, 2 * rank, 0.0, names, False)
    save_value_head(ValueHead(model.config.hidden_size), folder)
    load_tokenizer(str(model_dir)).save_pretrained(folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "cutoff_len": 512}))


def prompt_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the a model learns data from tokens and rewards over many small steps while values move".split()
    return [{"instruction": " ".join(rng.choices(words, k=rng.randint(8, 50))), "input": "", "output": "ok"}
            for _ in range(n)]


def weight_counts(model_dir: Path) -> tuple[int, int]:
    """(weights of the decoder layers' matmuls, weights of lm_head)."""
    model = load_model(str(model_dir), torch.float32, torch.device("meta"))
    layers = sum(p.numel() for p in model.get_decoder().layers.parameters() if p.dim() == 2)
    return layers, model.get_output_embeddings().weight.numel()


def phase_flops(stage: str, layers: int, head: int, prompt_tokens: float, response_tokens: float, group: int,
                with_reference: bool, policy_rescored: bool) -> dict:
    """FLOPs of one step's phases (see the module docstring). `prompt_tokens` counts each of a GRPO
    group's samples (as the passes over whole sequences run them); sampling prefills a prompt once."""
    sequence = prompt_tokens + response_tokens
    generation = 2 * layers * (prompt_tokens / group + response_tokens) + 2 * head * response_tokens
    policy_pass = 2 * layers * sequence + 2 * head * response_tokens
    passes = int(with_reference) + int(policy_rescored)  # pi_old from a forward unless the sampler's are exact
    scoring = passes * policy_pass + (2 * layers * sequence if stage == "ppo" else 0)
    return {"generation": generation, "scoring": scoring, "update": 2 * policy_pass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="40m", help="size preset of the random-init model (without --model)")
    parser.add_argument("--model", default=None, help="a model folder instead of --init")
    parser.add_argument("--reward-model", default=None, help="a `stage: rm` folder (default: a random LoRA one)")
    parser.add_argument("--dataset", default=None, help="a prompts file (default: 64 generated prompts)")
    parser.add_argument("--stage", default="ppo", choices=["ppo", "grpo"])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="grpo, ppo with a grouped estimator: answers per prompt")
    parser.add_argument("--estimator", default="gae", choices=["gae", "grpo", "rloo", "reinforce_pp"],
                        help="ppo: advantage_estimator")
    parser.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"], help="grpo: loss_type")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config key, e.g. --set rollout_engine=true (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tunesmith_bench_rl_") as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else init_model(root / "model", arch="qwen2", size=args.init, seed=0)
        reward_dir = Path(args.reward_model) if args.reward_model else root / "rm"
        if not args.reward_model:
            make_reward_adapter(model_dir, reward_dir, rank=8)
        prompts = Path(args.dataset) if args.dataset else root / "prompts.json"
        if not args.dataset:
            prompts.write_text(json.dumps(prompt_records(64, seed=0)))
        settings = {
            "stage": args.stage, "model_name_or_path": str(model_dir), "dataset": str(prompts),
            "output_dir": str(root / "out"), "lora_rank": 8, "lora_target": "all", "cutoff_len": 512,
            "per_device_train_batch_size": args.prompts, "max_steps": args.warmup + args.steps, "logging_steps": 1,
            "save_steps": 0, "ppo_epochs": 1, "max_new_tokens": args.new_tokens, "learning_rate": 1e-5,
            "bf16": torch.cuda.is_available(),
        }
        group = args.generations if args.stage == "grpo" or args.estimator in ("grpo", "rloo") else 1
        settings.update({"num_generations": group} if group > 1 else {})
        settings.update({"advantage_estimator": args.estimator} if args.stage == "ppo" else {"loss_type": args.loss_type})
        settings["reward_model" if args.stage == "ppo" else "reward_function"] = (
            str(reward_dir) if args.stage == "ppo" else "tunesmith.demos.synthetic:kindness_reward")
        for item in args.set:
            key, _, value = item.partition("=")
            settings[key] = yaml.safe_load(value)
        config = build_config(settings)
        run_training(config, say=lambda *a: None)
        timed = [line for line in read_log(root / "out") if "step_seconds" in line][args.warmup:]
        layers, head = weight_counts(model_dir)
    mean = lambda key: sum(line[key] for line in timed) / len(timed)  # noqa: E731
    seconds = mean("step_seconds")
    response_tokens = mean("response_length") * args.prompts * group
    prompt_tokens = sum(line["tokens_per_second"] * line["step_seconds"] for line in timed) / len(timed) - response_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = max(matmul_peak_flops(dtype, device, n) for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048)))
    flops = phase_flops(args.stage, layers, head, prompt_tokens, response_tokens, group,
                        with_reference=args.stage == "ppo" or config.method.ppo_kl_coef > 0,
                        policy_rescored=settings["bf16"])  # sampler statistics are used in fp32 only
    if config.method.rollout_engine:  # the reference (and reward) rows read the answers while they are drawn
        flops["generation"] += flops.pop("scoring")
    mfu = {f"mfu/{phase}": float(f"{flops[phase] / mean(f'time/{phase}') / peak:.3g}") for phase in flops
           if mean(f"time/{phase}") > 0}  # significant digits: a GPU's MFU on a 40M model is ~1e-4
    weight_bytes = (layers + head) * torch.tensor([], dtype=dtype).element_size()
    print(json.dumps({
        "stage": args.stage, **({"advantage_estimator": args.estimator} if args.stage == "ppo" else {"loss_type": args.loss_type}), "model": args.model or args.init, "prompts_per_step": args.prompts, "new_tokens": args.new_tokens,
        "mean_response_length": round(mean("response_length"), 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "seconds_per_step": round(seconds, 3),
        **{key: round(mean(key), 3) for key in ("time/generation", "time/scoring", "time/update")},
        "tokens_per_second": round(mean("tokens_per_second"), 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu": float(f"{sum(flops.values()) / seconds / peak:.3g}"), **mfu,
        # decode steps: the longest answer's length, max_new_tokens for a random-init model
        "decode_weight_gb_per_s": round(args.new_tokens * weight_bytes / mean("time/generation") / 1e9, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
