"""PPO and GRPO end to end on the tiny model: logs, learning, resume, reward sources, and their errors."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.model.loading import load_tokenizer
from tunesmith.model.value_head import attach_value_head
from tunesmith.training import rewards
from tunesmith.training.configure import build_config
from tunesmith.training.rl import build_prompt_rows
from tunesmith.training.rollout import response_forward
from tunesmith.training.run import run_training
from tunesmith.training.tracking import read_log

PPO_METRICS = {"score", "kl", "kl_coef", "reward", "entropy", "response_length", "eos_share", "loss/policy",
               "loss/value", "policy/clipfrac", "policy/approxkl", "value/clipfrac", "grad_norm"}


def test_ppo_runs_logs_every_metric_and_saves_a_peft_adapter(rl_settings):
    metrics = run_training(build_config({**rl_settings, "val_size": 1, "ppo_target": 1.0}), say=lambda *a: None)
    log = read_log(Path(rl_settings["output_dir"]))
    train_lines = [line for line in log if "score" in line]
    assert len(train_lines) == 3 and PPO_METRICS <= set(train_lines[0])
    assert abs(train_lines[0]["kl"]) < 1e-4  # a fresh adapter (B = 0) is the reference, to float rounding
    assert train_lines[1]["kl_coef"] != train_lines[0]["kl_coef"]  # the adaptive controller moved
    assert "eval_score" in metrics
    out = Path(rl_settings["output_dir"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value_head.safetensors").exists()


@pytest.mark.parametrize("stage,extra", [
    ("grpo", {"num_generations": 3}),
    ("ppo", {"ppo_target": 0.5, "ppo_score_norm": True}),  # the KL coefficient and score moments are resumed
])
def test_resume_is_bit_exact(rl_settings, tmp_path, stage, extra):
    settings = {**rl_settings, "stage": stage, **extra, "per_device_train_batch_size": 2, "max_steps": 4,
                "save_steps": 2}
    run_training(build_config(settings), say=lambda *a: None)
    full = read_log(Path(settings["output_dir"]))
    if stage == "grpo":
        assert {"zero_std_share", "kl", "policy/clipfrac", "score"} <= set(full[0])
    resumed_settings = {**settings, "output_dir": str(tmp_path / "resumed")}
    run_training(build_config({**resumed_settings, "max_steps": 4}), say=lambda *a: None)
    run_training(build_config({**resumed_settings, "resume_from_checkpoint": str(tmp_path / "resumed" / "checkpoint-2")}),
                 say=lambda *a: None)
    resumed = read_log(tmp_path / "resumed")
    def without_timings(records):
        drop = ("tokens_per_second", "step_seconds", "elapsed_time", "remaining_time")
        return [{k: v for k, v in r.items() if k not in drop and not k.startswith("time/")} for r in records]

    assert without_timings(resumed) == without_timings(full)


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "grpo"])
def test_critic_free_estimators_train_without_a_value_head(rl_settings, estimator):
    settings = {**rl_settings, "advantage_estimator": estimator, "per_device_train_batch_size": 2}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "score" in line]
    assert len(lines) == 3 and {"loss/policy", "policy/clipfrac", "kl", "reward"} <= set(lines[0])
    assert "loss/value" not in lines[0] and "value" not in lines[0]
    out = Path(settings["output_dir"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value_head.safetensors").exists()


def test_several_reward_functions_are_summed_with_weights_and_logged_by_name(rl_settings, tmp_path):
    (tmp_path / "more.py").write_text("def length(completions):\n    return [len(c) / 10 for c in completions]\n"
                                      "def count_a(completions):\n    return [1.0] * len(completions)\n")
    functions = f"{tmp_path / 'reward.py'}:count_a, {tmp_path / 'more.py'}:length"
    settings = {**rl_settings, "stage": "grpo", "num_generations": 2, "reward_function": functions,
                "reward_weights": "2.0,0.5", "max_steps": 2}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "score" in line]
    for line in lines:
        assert line["score"] == pytest.approx(2.0 * line["rewards/count_a"] + 0.5 * line["rewards/length"], rel=1e-5)
    # the same function name from two files is logged under each full spec
    source = rewards.WeightedRewards([f"{tmp_path / 'reward.py'}:count_a", f"{tmp_path / 'more.py'}:count_a"])
    assert source([rewards.Scored([{"role": "user", "content": "Hi"}], "aaaa", None)]) == [2.0]
    assert len(source.last) == 2


@pytest.mark.parametrize("weights,message", [("1.0", "2 reward functions"), ("1.0,x", "must be numbers")])
def test_bad_reward_weights_are_named(rl_settings, tmp_path, weights, message):
    functions = f"{tmp_path / 'reward.py'}:count_a,{tmp_path / 'reward.py'}:count_a"
    with pytest.raises(TunesmithError, match=message):
        run_training(build_config({**rl_settings, "reward_function": functions, "reward_weights": weights}),
                     say=lambda *a: None)


def test_dapo_settings_run_and_log_what_they_leave_out(rl_settings):
    settings = {**rl_settings, "stage": "grpo", "num_generations": 3, "per_device_train_batch_size": 2,
                "loss_type": "dapo", "epsilon_high": 0.28, "scale_rewards": "batch", "mask_truncated_completions": True,
                "drop_zero_std_groups": True, "overlong_buffer_len": 4, "ppo_kl_coef": 0.0}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "score" in line]
    assert len(lines) == 3 and {"dropped_share", "overlong_penalty", "zero_std_share"} <= set(lines[0])
    assert all(line["overlong_penalty"] <= 0 for line in lines)


def test_groups_of_equal_rewards_dropped_leave_the_adapter_untouched(rl_settings, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "flat.py").write_text("def flat(completions):\n    return [1.0] * len(completions)\n")
    settings = {**rl_settings, "stage": "grpo", "num_generations": 2, "drop_zero_std_groups": True,
                "reward_function": f"{tmp_path / 'flat.py'}:flat", "max_steps": 2}
    run_training(build_config(settings), say=lambda *a: None)
    lines = [line for line in read_log(Path(settings["output_dir"])) if "score" in line]
    assert [line["dropped_share"] for line in lines] == [1.0, 1.0]
    weights = load_file(str(Path(settings["output_dir"]) / "adapter_model.safetensors"))
    assert all(not tensor.any() for name, tensor in weights.items() if "lora_B" in name)  # no optimizer step ran


def test_prompt_only_records_train_and_reach_the_reward_function_without_a_reference(rl_settings, tmp_path,
                                                                                       write_dataset):
    write_dataset(tmp_path, "asks", [{"instruction": "Say a word."}, {"instruction": "Greet me.", "output": ""},
                                     {"instruction": "Name a color.", "output": "red"}], {})
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "seen.py").write_text(
        "import json\ndef reward(completions, references):\n"
        f"    open({str(seen)!r}, 'a').write(json.dumps(references) + '\\n')\n    return [0.0] * len(completions)\n")
    settings = {**rl_settings, "stage": "grpo", "num_generations": 2, "per_device_train_batch_size": 3, "max_steps": 1,
                "dataset": "asks", "dataset_dir": str(tmp_path), "reward_function": f"{tmp_path / 'seen.py'}:reward"}
    run_training(build_config(settings), say=lambda *a: None)
    references = json.loads(seen.read_text().splitlines()[0])
    assert sorted(references, key=str) == [None, None, None, None, "red", "red"]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_preference_data_gives_rl_its_prompts_with_a_notice(rl_settings, tmp_path, write_dataset, stage):
    """The book's PPO recipe: a dpo_en_demo-style file (ranking: true) as the PPO prompt set."""
    write_dataset(tmp_path, "pairs", [{"instruction": "Say a word.", "input": "", "chosen": "aaa", "rejected": "b"},
                                      {"instruction": "Greet me.", "input": "", "chosen": "hi", "rejected": "no"}],
                  {"ranking": True})
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "seen.py").write_text(
        "import json\ndef reward(prompts, completions, references):\n"
        f"    open({str(seen)!r}, 'a').write(json.dumps([prompts, references]) + '\\n')\n    return [0.5] * len(prompts)\n")
    settings = {**rl_settings, "stage": stage, "num_generations": 2, "per_device_train_batch_size": 2, "max_steps": 1,
                "dataset": "pairs", "dataset_dir": str(tmp_path), "reward_function": f"{tmp_path / 'seen.py'}:reward"}
    with pytest.warns(UserWarning, match="reads only its prompts; the chosen and rejected answers are ignored"):
        run_training(build_config(settings), say=lambda *a: None)
    prompts, references = json.loads(seen.read_text().splitlines()[0])
    assert set(prompts) == {"Say a word.", "Greet me."} and references == [None] * len(prompts)


def test_a_reward_function_over_answerless_data_is_warned_about(rl_settings, tmp_path, write_dataset):
    """All references None with a reward function usually means the answer column is not mapped."""
    write_dataset(tmp_path, "asks", [{"question": "2+2?", "answer": "4"}],
                  {"columns": {"prompt": "question"}})  # "response": "answer" forgotten
    config = build_config({**rl_settings, "dataset": "asks", "dataset_dir": str(tmp_path)})
    with pytest.warns(UserWarning, match="references are all None"):
        rows = build_prompt_rows(config.data.dataset, config.data, config.sampling.max_new_tokens,
                                 load_tokenizer(config.model.model_name_or_path), warn_unanswered=True)
    assert rows[0]["reference"] is None and rows[0]["messages"] == [{"role": "user", "content": "2+2?"}]


def test_response_forward_matches_the_plain_model(make_tiny_model):
    model = make_tiny_model("qwen2")
    attach_value_head(model)
    prompts, responses = [[5, 6, 7], [9]], [[10, 11], [12, 13, 14, 15]]
    logps, entropy, values = response_forward(model, prompts, responses, pad_id=0, chunk_size=3, temperature=0.5,
                                              with_values=True)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([prompt + response])
        out = model(ids, output_hidden_states=True)
        start = len(prompt) - 1
        log_probs = torch.log_softmax(out.logits[0, start:start + len(response)] / 0.5, dim=-1)
        torch.testing.assert_close(logps[i, :len(response)], log_probs.gather(1, torch.tensor(response)[:, None]).squeeze(1))
        torch.testing.assert_close(entropy[i, :len(response)], -(log_probs.exp() * log_probs).sum(-1))
        hidden = out.hidden_states[-1][0, start:start + len(response)]
        torch.testing.assert_close(values[i, :len(response)], model.v_head(hidden), rtol=1e-4, atol=1e-5)
        assert logps[i, len(response):].abs().sum() == 0


def test_http_reward_source_posts_conversations():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            answer = json.dumps({"scores": [float(len(m[-1]["content"])) for m in body["messages"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = rewards.http_rewards(f"http://127.0.0.1:{server.server_port}/v1/score")
        items = [rewards.Scored([{"role": "user", "content": "hi"}], "abc", None),
                 rewards.Scored([{"role": "user", "content": "yo"}], "a", None)]
        assert source(items) == [3.0, 1.0]
        assert seen[0]["messages"][0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    finally:
        server.shutdown()
    with pytest.raises(TunesmithError, match="scoring request failed"):
        rewards.http_rewards(f"http://127.0.0.1:{server.server_port}/gone", timeout=2)(items)


def test_reward_function_errors_are_clear(tmp_path):
    with pytest.raises(TunesmithError, match="module:function"):
        rewards.load_reward_function("no_colon")
    with pytest.raises(TunesmithError, match="does not exist"):
        rewards.load_reward_function(f"{tmp_path / 'missing.py'}:f")
    (tmp_path / "bad.py").write_text("def short(prompts, completions, references):\n    return [1.0]\n")
    with pytest.raises(TunesmithError, match="has no function 'nope'"):
        rewards.load_reward_function(f"{tmp_path / 'bad.py'}:nope")
    source = rewards.function_rewards(rewards.load_reward_function(f"{tmp_path / 'bad.py'}:short"), "bad.py:short")
    with pytest.raises(TunesmithError, match="returned 1 rewards for 2 completions"):
        source([rewards.Scored([{"role": "user", "content": "q"}], "a", None)] * 2)
    with pytest.raises(TunesmithError, match="is a full reward model"):
        rewards.reward_model_type(str(tmp_path), "lora")
    assert rewards.reward_model_type("https://example.org/score", None) == "api"


@pytest.mark.parametrize("change,message", [
    ({"reward_function": None}, "needs exactly one of `reward_model`"),
    ({"reward_model": "saves/rm"}, "needs exactly one of `reward_model`"),
    ({"stage": "grpo", "num_generations": 1}, "num_generations"),
    ({"finetuning_type": "full"}, "trains a LoRA adapter"),
    ({"max_new_tokens": 64, "cutoff_len": 64}, None),
    ({"temperature": 0}, "do_sample: true"),
    ({"do_sample": False}, "do_sample: true"),
    ({"ppo_kl_estimator": "k2"}, "ppo_kl_estimator"),
    ({"stage": "grpo", "loss_type": "token"}, "loss_type"),
    ({"advantage_estimator": "vtrace"}, "advantage_estimator"),
    ({"advantage_estimator": "rloo", "num_generations": 1}, "needs at least 2 answers"),
    ({"stage": "grpo", "scale_rewards": "rank"}, "scale_rewards"),
    ({"stage": "grpo", "importance_sampling_level": "answer"}, "importance_sampling_level"),
    ({"stage": "grpo", "overlong_buffer_len": 8}, "must be below max_new_tokens"),
])
def test_bad_rl_configs_stop_before_any_work(rl_settings, change, message):
    settings = {**rl_settings, **change}
    if message is None:  # passes validation, fails when the prompts are built: the budget is empty
        with pytest.raises(TunesmithError, match="must exceed max_new_tokens"):
            run_training(build_config(settings), say=lambda *a: None)
        return
    with pytest.raises(TunesmithError, match=message):
        build_config(settings)


def test_rlhf_demo_every_method_beats_sft_on_held_out_prompts(tmp_path):
    """The README's SFT -> RM -> PPO (+ GRPO, DPO) flow on the demo's small model (about 100 s on 2 cores)."""
    from tunesmith.demos.rlhf_demo import METHODS, run_rl_demo

    shares = run_rl_demo(str(tmp_path / "demo"), say=lambda *a: None)
    for method in METHODS:
        assert shares[method] >= shares["sft"] + 0.3, shares


def _random_lora_reward_model(base: str, folder: Path, targets) -> None:
    """A LoRA reward model folder as `stage: rm` writes one, with random adapter weights and head."""
    import yaml

    from tunesmith.model.adapters import save_adapter
    from tunesmith.model.loading import load_model, load_tokenizer
    from tunesmith.model.lora import inject_lora, lora_modules
    from tunesmith.model.value_head import ValueHead, save_value_head

    model = load_model(base, torch.float32, torch.device("cpu"))
    inject_lora(model, targets, 4, 8)
    torch.manual_seed(3)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.2)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_modules(model)})
    save_adapter(model, folder, base, 4, 8, 0.0, names, False)
    save_value_head(ValueHead(model.config.hidden_size), folder)
    load_tokenizer(base).save_pretrained(folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": base, "cutoff_len": 64}))


def test_a_lora_reward_model_shares_the_policy_base_and_scores_the_same(tiny_model, tmp_path):
    from tunesmith.model.loading import load_model
    from tunesmith.model.lora import inject_lora
    from tunesmith.model.reward_model import RewardModel

    _random_lora_reward_model(tiny_model, tmp_path / "rm", "all")
    conversations = [[{"role": "user", "content": "Describe the river."}, {"role": "assistant", "content": text}]
                     for text in ("The river is calm.", "The river is cold, grey.", "Rivers.")]
    alone = RewardModel.load(tmp_path / "rm", dtype=torch.float32).score(conversations)
    policy = load_model(tiny_model, torch.float32, torch.device("cpu"))
    inject_lora(policy, "all", 4, 8)
    attach_value_head(policy)  # the critic: the shared reward model must use its own head
    shared = RewardModel.sharing_base(policy, tmp_path / "rm", tiny_model, None)
    assert shared is not None and shared.head is not policy.v_head
    torch.testing.assert_close(torch.tensor(shared.score(conversations)), torch.tensor(alone), atol=1e-5, rtol=0)
    narrow = load_model(tiny_model, torch.float32, torch.device("cpu"))
    inject_lora(narrow, ["q_proj", "v_proj"], 4, 8)
    assert RewardModel.sharing_base(narrow, tmp_path / "rm", tiny_model, None) is None  # adapts more layers
    assert RewardModel.sharing_base(policy, tmp_path / "rm", tiny_model, [str(tmp_path / "rm")]) is None  # other base


def test_reward_functions_get_only_the_keywords_they_take(tmp_path):
    (tmp_path / "trl_style.py").write_text(
        "def by_length(completions, **kwargs):\n    return [len(c) + len(kwargs['references']) for c in completions]\n"
        "def needs_more(completions, solution):\n    return [0.0] * len(completions)\n"
        "def boom(completions):\n    raise ValueError('bad answer format')\n")
    spec = f"{tmp_path / 'trl_style.py'}"
    items = [rewards.Scored([{"role": "user", "content": "q"}], "abc", "r")]
    assert rewards.function_rewards(rewards.load_reward_function(f"{spec}:by_length"), "f")(items) == [4.0]
    with pytest.raises(TunesmithError, match="asks for solution"):
        rewards.function_rewards(rewards.load_reward_function(f"{spec}:needs_more"), "f")
    with pytest.raises(TunesmithError, match="raised ValueError: bad answer format"):
        rewards.function_rewards(rewards.load_reward_function(f"{spec}:boom"), "f")(items)
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(TunesmithError, match="loading .* failed: SyntaxError"):
        rewards.load_reward_function(f"{tmp_path / 'broken.py'}:f")


def test_a_missing_reward_model_stops_before_the_model_loads(rl_settings, tmp_path):
    settings = {**rl_settings, "reward_function": None, "reward_model": str(tmp_path / "no_such_rm")}
    with pytest.raises(TunesmithError, match="is not a reward model folder"):
        run_training(build_config(settings), say=lambda *a: None)


@pytest.mark.parametrize("stage,extra", [("ppo", {}), ("ppo", {"advantage_estimator": "rloo"}), ("grpo", {}),
                                         ("grpo", {"loss_type": "dapo"}),
                                         ("grpo", {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"})])
def test_micro_batches_combine_into_the_big_batch_gradient(rl_settings, stage, extra):
    from tunesmith.training.reference import Reference
    from tunesmith.training.run import prepare_training
    from tunesmith.training.stages import StageInputs, grpo, ppo

    config = build_config({**rl_settings, "stage": stage, "num_generations": 2, "per_device_train_batch_size": 2, **extra})
    run = prepare_training(config)
    model = run.model
    inputs = StageInputs(model, run.config, run.tokenizer, run.data, run.device, Reference.of(model, torch.float32))
    rl = (ppo.ppo_parts if stage == "ppo" else grpo.grpo_parts)(inputs)
    rollout, _ = rl.rollout(model, run.data.train[:2], list(range(2 * rl.samples_per_prompt)))

    def grads(parts):
        model.zero_grad()
        items = [rl.loss_items(part) for part in parts]
        for part, part_items in zip(parts, items):
            (rl.loss(model, part)[0] * part_items / sum(items)).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole = grads([rollout.select(list(range(len(rollout))))])
    split = grads([rollout.select([i]) for i in range(len(rollout))])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_llama_factory_ppo_example_keys_validate(tmp_path):
    """LLaMA-Factory's examples/train_lora/llama3_lora_ppo.yaml, paths changed: it validates, its
    multi-process keys get notices, and its generation keys mean the same here."""
    raw = {
        "model_name_or_path": "some/model", "reward_model": "saves/llama3-8b/lora/reward", "trust_remote_code": True,
        "stage": "ppo", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
        "dataset": "identity,alpaca_en_demo", "template": "llama3", "cutoff_len": 2048, "max_samples": 1000,
        "overwrite_cache": True, "preprocessing_num_workers": 16, "dataloader_num_workers": 4,
        "output_dir": "saves/llama3-8b/lora/ppo", "logging_steps": 10, "save_steps": 500, "plot_loss": True,
        "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8, "learning_rate": 1.0e-5, "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "ddp_timeout": 180000000,
        "max_new_tokens": 512, "top_k": 0, "top_p": 0.9,
    }
    notices = []
    config = build_config(raw, notices=notices)
    assert (config.stage, config.sampling.max_new_tokens, config.sampling.top_p, config.method.reward_model) == ("ppo", 512, 0.9, raw["reward_model"])
    assert len(notices) == 3 and config.distributed.ddp_timeout == 180000000
    with pytest.raises(TunesmithError, match="reward_model_adapters.*stage: rm"):
        build_config({**raw, "reward_model_adapters": "x"})


def test_a_group_sharing_its_prompt_matches_each_answer_alone_with_the_same_gradients(make_tiny_model):
    from tunesmith.model.attention import prefixes_applied
    from tunesmith.model.loading import use_varlen_attention
    shared = make_tiny_model("qwen2")
    use_varlen_attention(shared)
    plain = make_tiny_model("qwen2")  # transformers' sdpa: every answer re-reads its prompt
    prompts = [[5, 6, 7], [9, 4], [5, 6, 7], [5, 6, 7], [9, 4]]  # two groups, shuffled as the update shuffles
    responses = [[10, 11], [12, 13, 14, 15], [16], [17, 18, 19], [20, 21]]
    results = []
    for model in (shared, plain):
        before = prefixes_applied()
        logps, entropy, _ = response_forward(model, prompts, responses, pad_id=0, chunk_size=4, temperature=0.7,
                                             with_values=False)
        assert (prefixes_applied() > before) == (model is shared)  # the answers did read a shared prompt
        (logps * torch.arange(1.0, logps.shape[1] + 1)).sum().backward()  # a different weight per token
        results.append((logps, entropy, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (shared_logps, shared_entropy, shared_grads), (plain_logps, plain_entropy, plain_grads) = results
    torch.testing.assert_close(shared_logps, plain_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_entropy, plain_entropy, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):  # and each answer alone, by hand
        log_probs = torch.log_softmax(plain(torch.tensor([prompt + response])).logits[0] / 0.7, dim=-1)
        alone = log_probs[len(prompt) - 1:-1].gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(shared_logps[i, :len(response)], alone.detach(), rtol=1e-5, atol=1e-5)
