"""LLaMA-Factory SFT LoRA throughput on this machine: non-pad tokens/s over timed steps, and peak RSS.

    ../lf_venv/bin/python benchmarks/llamafactory/time_lf.py --steps 13     # after setup.sh; 3 warm-up + 10 timed

Runs LLaMA-Factory in-process (`llamafactory.train.tuner.run_exp(args, callbacks=[...])`) with the
YAML next to this file, overriding max_steps. The first --warmup optimizer steps are discarded.

Two timings are reported:
- tokens_per_second (primary): non-pad tokens of the timed steps / wall time from the end of the last
  warm-up step to the end of the last step. This includes fetching and collating each batch, like
  tunesmith's loop window (which collates inside the loop).
- step_window_tokens_per_second: the same tokens / the summed on_step_begin..on_step_end windows
  (HF Trainer prefetches the batch before on_step_begin, so this excludes data loading).

Non-pad tokens are counted twice, independently: the Trainer's `include_num_input_tokens_seen:
non_padding` (attention_mask.sum() of each batch) and a forward pre-hook on the model that sums the
attention_mask it is called with; the script checks that they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "lf_sft.yaml"))
    parser.add_argument("--steps", type=int, default=13, help="total optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps left out of the timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2 = this machine's default)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    import torch
    import yaml
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    lf_args = yaml.safe_load(Path(args.config).read_text())
    lf_args["max_steps"] = args.steps
    lf_args["logging_steps"] = args.steps  # one log line, after the last step (outside the timed span)
    lf_args["include_num_input_tokens_seen"] = "non_padding"
    lf_args["save_strategy"] = "no"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = []  # per step: begin, end, trainer tokens, hook tokens, rows, padded positions
            self.hook_tokens = self.hook_rows = self.hook_positions = 0
            self._begin = self._seen = None
            self._handle = None

        def _count(self, module, args_, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args_[0] if args_ else None)
            if mask is not None:
                self.hook_tokens += int(mask.sum())
                self.hook_positions += mask.numel()
                self.hook_rows += mask.shape[0]
            elif ids is not None:
                self.hook_tokens += ids.numel()
                self.hook_positions += ids.numel()
                self.hook_rows += ids.shape[0]

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            if model is not None and self._handle is None:
                self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

        def on_step_begin(self, args_, state, control, **kwargs):
            self._seen = state.num_input_tokens_seen
            self.hook_tokens = self.hook_rows = self.hook_positions = 0
            self._begin = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            end = time.perf_counter()
            self.steps.append({"begin": self._begin, "end": end, "tokens": state.num_input_tokens_seen - self._seen,
                               "hook_tokens": self.hook_tokens, "rows": self.hook_rows,
                               "positions": self.hook_positions})

        def on_train_end(self, args_, state, control, **kwargs):
            if self._handle is not None:
                self._handle.remove()

    timer = StepTimer()
    run_exp(lf_args, callbacks=[timer])

    steps = timer.steps
    if len(steps) != args.steps:
        raise SystemExit(f"expected {args.steps} steps, saw {len(steps)}")
    timed = steps[args.warmup:]
    tokens = sum(s["tokens"] for s in timed)
    hook_tokens = sum(s["hook_tokens"] for s in timed)
    wall = timed[-1]["end"] - steps[args.warmup - 1]["end"] if args.warmup else timed[-1]["end"] - timed[0]["begin"]
    window = sum(s["end"] - s["begin"] for s in timed)
    import accelerate
    import llamafactory
    import peft
    import transformers
    result = {
        "framework": f"llamafactory {llamafactory.__version__}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},
        "threads": torch.get_num_threads(),
        "steps_total": args.steps, "warmup_steps": args.warmup, "timed_steps": len(timed),
        "batch_size": lf_args.get("per_device_train_batch_size"), "cutoff_len": lf_args.get("cutoff_len"),
        "gradient_checkpointing": not lf_args.get("disable_gradient_checkpointing", False),
        "non_pad_tokens_timed": tokens,
        "non_pad_tokens_timed_hook": hook_tokens,
        "counts_agree": tokens == hook_tokens,
        "padded_positions_timed": sum(s["positions"] for s in timed),
        "timed_wall_s": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "step_window_s": round(window, 3),
        "step_window_tokens_per_second": round(tokens / window, 2),
        "per_step_s": [round(s["end"] - s["begin"], 3) for s in steps],
        "per_step_tokens": [s["tokens"] for s in steps],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print("TIME_LF_RESULT " + json.dumps(result), flush=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
