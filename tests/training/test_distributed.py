"""Several ranks (torchrun, gloo on the CPU) give the same training as one process with the combined batch.

Each rank takes per_device_train_batch_size rows, one process takes ranks x that many; after 3 optimizer
steps the trainable weights must agree within 1e-5. This is also the test that catches a backend that
averages gradients where tunesmith sums them (PyTorch issue 162338, FSDP2 on gloo): the weights would
then move half as far.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.demos.synthetic import preference_records
from tunesmith.errors import TunesmithError
from tunesmith.model.loading import load_model
from tunesmith.training.configure import build_config
from tunesmith.training.distributed import ProcessInfo
from tunesmith.training.launch import torchrun_command
from tunesmith.training.loop import step_rows, steps_per_epoch
from tunesmith.training.run import run_training
from tunesmith.training.tracking import read_log

RECORDS = [
    {"instruction": f"Say {word}.", "input": "", "output": f"{word.title()} to you, friend number {i}!"}
    for i, word in enumerate(["hello", "bye", "thanks", "sorry", "yes", "no", "maybe", "please"])
]


@pytest.fixture
def dist_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "chat.json").write_text(json.dumps(RECORDS))
    pairs = preference_records(16, seed=0)
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "kto.json").write_text(json.dumps([{"instruction": p["instruction"], "output": p[side], "label": side == "chosen"}
                                                 for p in pairs[:8] for side in ("chosen", "rejected")]))
    (folder / "dataset_info.json").write_text(json.dumps({
        "chat": {"file_name": "chat.json"}, "pairs": {"file_name": "pairs.json", "ranking": True},
        "kto": {"file_name": "kto.json", "columns": {"kto_tag": "label"}}}))
    return folder


def settings_for(tiny_model, data, stage: str, finetuning_type: str) -> dict:
    """A 3-step run. Adam moves a weight whose gradient is at rounding level by a full lr-sized step in the
    direction of that noise, and any other order of the same sums (two ranks, another thread count) changes
    the noise: so the reward model (a few such LoRA entries: the score reads one position) and full
    fine-tuning (every weight trains) use smaller learning rates; measured differences otherwise: 1e-4 and
    1.2e-5 after 3 steps."""
    return {"model_name_or_path": tiny_model, "dataset": {"sft": "chat", "kto": "kto"}.get(stage, "pairs"),
            "dataset_dir": str(data), "stage": stage, "finetuning_type": finetuning_type, "cutoff_len": 64,
            "learning_rate": (1e-2 if stage != "rm" else 1e-3) if finetuning_type == "lora" else 1e-4, "max_steps": 3, "logging_steps": 1,
            "save_steps": 0, "seed": 0, "lora_rank": 4, "lora_target": "all", "lora_dropout": 0.0}


def torchrun(settings: dict, folder: Path, nproc: int = 2, extra_env: dict | None = None, check: bool = True):
    """`tunesmith train` on `nproc` gloo ranks of one thread each (NPROC_PER_NODE, as LLaMA-Factory users do)."""
    config = folder.parent / f"{folder.name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "TUNESMITH_THREADS_PER_RANK": "1", **(extra_env or {})}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(config)], env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def trained_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (output_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    weights = load_file(str(output_dir / name))
    head = output_dir / "value_head.safetensors"
    return weights | (load_file(str(head)) if head.exists() else {})


def assert_same_weights(one: Path, two: Path, tolerance: float = 2e-5) -> None:
    """Equal to rounding. One process multiplies the combined batch's shapes, each rank half of them, and
    algorithms/linear.py sends a product to MKL or oneDNN by its size, so the two can round differently:
    KTO's weights differed by 1.0e-5 after Adam where the same GEMM on both sides gave 4e-6."""
    a, b = trained_weights(one), trained_weights(two)
    assert sorted(a) == sorted(b)
    # A reward model's pairwise loss does not see the value head's bias (it cancels in chosen - rejected), so
    # its gradient is rounding noise, which Adam scales up to full-size steps: it is not comparable.
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if k != "v_head.summary.bias")
    assert worst < tolerance, worst


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


SLOW = pytest.mark.slow  # run with `pytest -m slow`; CI runs one case of each kind


@pytest.mark.parametrize("stage,finetuning_type,extra", [
    ("sft", "lora", {}), pytest.param("rm", "lora", {}, marks=SLOW), pytest.param("dpo", "lora", {}, marks=SLOW),
    pytest.param("sft", "full", {}, marks=SLOW),
    pytest.param("kto", "lora", {}, marks=SLOW),  # the reference point z is all-reduced: the same z as one batch
    pytest.param("kto", "full", {}, marks=SLOW),  # fsdp: the mismatched answers' no-grad pass gathers shards too
    # fsdp across an epoch: ranks hit and miss the reference cache apart; the reference is an unsharded copy
    pytest.param("dpo", "full", {"max_steps": 6}, marks=SLOW),
    ("dpo", "full", {"precompute_ref_logprobs": True})])  # each rank precomputes its share of the pairs
def test_two_ranks_equal_one_process_with_the_combined_batch(tiny_model, dist_data, tmp_path, stage, finetuning_type,
                                                             extra):
    settings = {**settings_for(tiny_model, dist_data, stage, finetuning_type), **extra}
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "one")}),
                 say=lambda *_: None)
    done = torchrun({**settings, "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "two")},
                    tmp_path / "two")
    strategy = "fsdp" if finetuning_type == "full" else "ddp"  # auto: full fine-tuning shards
    assert f"2 ranks ({strategy})" in done.stdout + done.stderr
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)


@pytest.mark.parametrize("stage", ["grpo", pytest.param("ppo", marks=SLOW)])
def test_rl_on_two_ranks_equals_one_process(tiny_model, dist_data, tmp_path, stage):
    """Each rank samples its share of the prompts (a GRPO group on one rank), every answer from its own seed;
    whitening, score normalisation and the adaptive KL controller use statistics over both ranks."""
    settings = {**settings_for(tiny_model, dist_data, "sft", "lora"), "stage": stage, "max_new_tokens": 6,
                "reward_function": "tunesmith.demos.synthetic:kindness_reward", "num_generations": 2,
                "ppo_epochs": 2, "learning_rate": 1e-2, "ppo_score_norm": True}
    if stage == "ppo":
        settings["ppo_target"] = 1.0
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "one")}),
                 say=lambda *_: None)
    torchrun({**settings, "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "two")}, tmp_path / "two")
    # PPO's whitened advantages divide by a small std and its critic adds a second loss, so rounding grows
    # faster there (measured: 2.7e-5 after 3 steps); GRPO stays within 1e-5.
    assert_same_weights(tmp_path / "one", tmp_path / "two", 1e-5 if stage == "grpo" else 1e-4)
    one, two = (read_log(tmp_path / name) for name in ("one", "two"))
    for key in ("score", "score_std", "kl", "reward", "response_length", "loss"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-5), key


def test_checkpoints_resume_on_another_number_of_ranks(tiny_model, dist_data, tmp_path):
    """fsdp on 2 ranks -> 1 process and -> 2 ranks again, and 1 process -> 2 ranks: each ends where an
    uninterrupted run ends. An fsdp checkpoint holds each rank's shards (safetensors, nothing gathered)."""
    settings = {**settings_for(tiny_model, dist_data, "sft", "full"), "max_steps": 4, "save_steps": 2,
                "distributed_strategy": "fsdp"}
    uninterrupted = tmp_path / "whole"
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(uninterrupted)}),
                 say=lambda *_: None)
    two_then_one = tmp_path / "two_then_one"
    torchrun({**settings, "per_device_train_batch_size": 2, "max_steps": 4, "output_dir": str(two_then_one)},
             two_then_one)
    saved = two_then_one / "checkpoint-2"
    assert sorted(p.name for p in (saved / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (saved / "model.safetensors").exists() and not (saved / "trainable.safetensors").exists()
    with pytest.raises(TunesmithError, match="sharded"):
        load_model(str(saved), torch.float32, torch.device("cpu"))
    two_then_two = tmp_path / "two_then_two"
    shutil.copytree(saved, two_then_two / "checkpoint-2")
    torchrun({**settings, "per_device_train_batch_size": 2, "output_dir": str(two_then_two),
              "resume_from_checkpoint": "true"}, two_then_two)
    assert_same_weights(uninterrupted, two_then_two)
    (two_then_one / "model.safetensors").unlink()
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(two_then_one),
                               "resume_from_checkpoint": str(two_then_one / "checkpoint-2")}), say=lambda *_: None)
    assert_same_weights(uninterrupted, two_then_one)
    one_then_two = tmp_path / "one_then_two"
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(one_then_two)}),
                 say=lambda *_: None)
    torchrun({**settings, "per_device_train_batch_size": 2, "output_dir": str(one_then_two),
              "resume_from_checkpoint": str(one_then_two / "checkpoint-2")}, one_then_two)
    assert_same_weights(uninterrupted, one_then_two)
    assert losses(one_then_two) == pytest.approx(losses(uninterrupted), abs=1e-5)


def test_two_nodes_on_one_machine(tiny_model, dist_data, tmp_path):
    """NNODES=2: the same command on each "node" (here two process trees on 127.0.0.1), rendezvous on node 0."""
    settings = settings_for(tiny_model, dist_data, "sft", "lora")
    run_training(build_config({**settings, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "one")}),
                 say=lambda *_: None)
    folder = tmp_path / "nodes"
    folder.mkdir()
    config = folder / "cfg.yaml"
    config.write_text(yaml.safe_dump({**settings, "per_device_train_batch_size": 2, "output_dir": str(folder / "out")}))
    port = str(29_500 + os.getpid() % 1000)
    nodes = []
    for node_rank in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(node_rank), "NPROC_PER_NODE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TUNESMITH_THREADS_PER_RANK": "1"}
        nodes.append(subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(config)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_weights(tmp_path / "one", folder / "out")


def test_launch_reads_llama_factory_variables():
    assert torchrun_command(["train", "c.yaml"], env={}) is None
    assert torchrun_command(["train", "c.yaml"], env={"LOCAL_RANK": "0", "NPROC_PER_NODE": "2"}) is None
    command = torchrun_command(["train", "c.yaml", "lr=1"], env={"NPROC_PER_NODE": "4", "MASTER_PORT": "1234"})
    assert command[1:4] == ["-m", "tunesmith.training.launch", "--nproc-per-node"] and command[4] == "4"
    assert command[command.index("--master-port") + 1] == "1234" and command[-3:] == ["train", "c.yaml", "lr=1"]
    forced = torchrun_command(["train", "c.yaml"], env={"FORCE_TORCHRUN": "1"})
    assert forced[forced.index("--nproc-per-node") + 1] == "1"
    assert torchrun_command(["train", "c.yaml"], nproc=2, env={})[4] == "2"
    with pytest.raises(Exception, match="MASTER_ADDR and MASTER_PORT"):
        torchrun_command(["train", "c.yaml"], env={"NNODES": "2"})
    with pytest.raises(Exception, match="NPROC_PER_NODE='two'"):
        torchrun_command(["train", "c.yaml"], env={"NPROC_PER_NODE": "two"})


def test_sigterm_stops_every_rank_after_one_step_and_resume_matches(tiny_model, dist_data, tmp_path):
    """SIGTERM to `tunesmith train` (2 ranks): both ranks stop after the same step, checkpoint it, exit 75;
    resuming ends bit for bit where the uninterrupted 2-rank run ends."""
    settings = {**settings_for(tiny_model, dist_data, "sft", "lora"), "max_steps": 150, "logging_steps": 10,
                "per_device_train_batch_size": 2}
    torchrun({**settings, "output_dir": str(tmp_path / "whole")}, tmp_path / "whole")
    out = tmp_path / "two"
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
    env = {**os.environ, "NPROC_PER_NODE": "2", "TUNESMITH_THREADS_PER_RANK": "1"}
    env.pop("LOCAL_RANK", None)
    child = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (out / "trainer_log.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=240)[0]
    assert child.returncode == 75, output[-3000:]
    saved = [p.name for p in (out).glob("checkpoint-*")]
    assert len(saved) == 1 and "resume_from_checkpoint: true" in output, output[-3000:]
    torchrun({**settings, "output_dir": str(out), "resume_from_checkpoint": "true"}, out)
    whole, resumed = trained_weights(tmp_path / "whole"), trained_weights(out)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)  # bit for bit on the CPU


def test_every_rank_runs_the_same_steps_and_rows_per_step():
    """Steps are counted over all ranks' rows; a short last step is filled from the start of the order, so
    collectives (fsdp's gathers, gradient sums) always pair up; one process sees exactly the order."""
    order = list(range(10, 15))  # 5 rows
    ranks = [ProcessInfo(rank, 2, rank, 2) for rank in (0, 1)]
    assert [steps_per_epoch(5, 1, proc) for proc in ranks] == [3, 3]
    assert [step_rows(order, 2, 1, proc) for proc in ranks] == [[14], [10]]
    assert steps_per_epoch(9, 4, ranks[0]) == steps_per_epoch(9, 4, ranks[1]) == 2
    assert [len(step_rows(list(range(9)), 1, 4, proc)) for proc in ranks] == [4, 4]
    one = ProcessInfo()
    assert steps_per_epoch(5, 2, one) == 3 and step_rows(order, 2, 2, one) == [14]
    # the union of the ranks' rows of a step is one process's step with the combined batch
    assert sorted(step_rows(order, 0, 1, ranks[0]) + step_rows(order, 0, 1, ranks[1])) == step_rows(order, 0, 2, one)


def test_ranks_get_balanced_shares_of_a_step():
    """Rows are dealt longest first to the rank with the fewest tokens: equal row counts, close token counts,
    and together exactly the step's rows."""
    lengths = [100, 3, 90, 5, 80, 7, 4, 6]
    order = list(range(8))
    ranks = [ProcessInfo(rank, 2, rank, 2) for rank in (0, 1)]
    shares = [step_rows(order, 0, 4, proc, lengths) for proc in ranks]
    assert sorted(shares[0] + shares[1]) == order and [len(s) for s in shares] == [4, 4]
    totals = [sum(lengths[i] for i in share) for share in shares]
    assert totals == [118, 177], totals  # the best split with 4 rows each; strided dealing gives 270 vs 25
