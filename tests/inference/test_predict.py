"""`do_predict` end to end on a tiny model: LLaMA-Factory's files and fields, batching changes nothing, and a
model that memorised its answers scores 100."""

import json
from pathlib import Path

import pytest

from tunesmith.inference.predict import PREDICTIONS_FILE, RESULTS_FILE, train_and_predict
from tunesmith.model.init_model import init_model
from tunesmith.training.configure import build_config
from tunesmith.training.run import trained_model_config

RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "Reverse", "input": "abc", "output": "It is cba."},
]  # 4+ characters and 2+ words each: an exact "cba" would score BLEU-4 84 and ROUGE-2 0 (as in LLaMA-Factory)
METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(init_model(tmp_path_factory.mktemp("model") / "tiny", arch="qwen2", size="tiny", seed=0))


@pytest.fixture
def settings(tiny_model, tmp_path):
    """A predict-only run on the tiny dataset (no `dataset`: do_train false needs none)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny.json").write_text(json.dumps(RECORDS))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return {"model_name_or_path": tiny_model, "do_train": False, "do_predict": True, "eval_dataset": "tiny",
            "dataset_dir": str(data), "output_dir": str(tmp_path / "predict"), "do_sample": False,
            "max_new_tokens": 8, "per_device_eval_batch_size": 3}


def run(settings: dict) -> tuple[dict, list[dict]]:
    metrics = train_and_predict(build_config(settings), say=lambda *_: None)
    lines = (Path(settings["output_dir"]) / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()
    return metrics, [json.loads(line) for line in lines]


def test_predict_only_writes_llama_factory_files(settings, tmp_path):
    metrics, lines = run(settings)
    assert len(lines) == len(RECORDS)
    assert all(list(line) == ["prompt", "predict", "label"] for line in lines)
    assert [line["label"] for line in lines] == [r["output"] for r in RECORDS]
    assert all(r["instruction"] in line["prompt"] and "<|im_start|>" not in line["prompt"]
               for r, line in zip(RECORDS, lines))
    assert all(0 <= metrics[key] <= 100 for key in METRICS)
    out = Path(settings["output_dir"])
    assert json.loads((out / RESULTS_FILE).read_text()) == metrics
    assert json.loads((out / "all_results.json").read_text()) == metrics
    assert {"predict_runtime", "predict_samples_per_second", "predict_steps_per_second"} <= metrics.keys()
    # batches of 3 (one left-padded) answer exactly as one prompt at a time, in record order
    _, alone = run({**settings, "per_device_eval_batch_size": 1, "output_dir": str(tmp_path / "alone")})
    assert alone == lines


def test_memorised_answers_score_100(settings, tmp_path):
    """Full SFT until the 4 answers are memorised, then greedy predictions on the same 4 records."""
    train = {**settings, "do_train": True, "dataset": "tiny", "finetuning_type": "full",
             "learning_rate": 3e-3, "max_steps": 40, "per_device_train_batch_size": 4,
             "lr_scheduler_type": "constant", "logging_steps": 20, "save_steps": 0, "cutoff_len": 64,
             "seed": 0, "max_new_tokens": 16, "output_dir": str(tmp_path / "full")}
    metrics, lines = run(train)
    assert metrics["loss"] < 0.05  # training's metrics come along
    assert [line["predict"] for line in lines] == [r["output"] for r in RECORDS]
    assert all(metrics[key] == 100 for key in METRICS)


def test_trained_model_config_points_at_what_training_wrote(tiny_model):
    base = {"model_name_or_path": tiny_model, "dataset": "tiny", "output_dir": "out", "do_predict": True,
            "eval_dataset": "tiny"}
    sft = trained_model_config(build_config({**base, "adapter_name_or_path": "a,b"}))
    assert sft.model.adapter_name_or_path == ["a", "out"]  # sft went on training b: out replaces it
    dpo = trained_model_config(build_config({**base, "stage": "dpo", "adapter_name_or_path": "a,b"}))
    assert dpo.model.adapter_name_or_path == ["a", "b", "out"]  # a fresh adapter on top of both
    full = trained_model_config(build_config({**base, "finetuning_type": "full"}))
    assert (full.model.model_name_or_path, full.model.adapter_name_or_path) == ("out", None)


LONG = " ".join(f"word{i}" for i in range(40))
CUT_RECORDS = [
    {"instruction": f"Repeat: {LONG}", "input": "", "output": "Done."},  # long prompt, short label
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},  # fits: unchanged
    {"instruction": f"Copy: {LONG}", "input": "", "output": LONG},  # both long: the budget is shared
    {"instruction": "Copy.", "input": "", "output": LONG},  # short prompt, long label: the prompt stays whole
]


def test_long_prompts_are_cut_as_training_cuts_them(settings, tmp_path):
    """With cutoff_len 40, each prompt keeps what encode_sft (training) keeps of its record, the answers are
    the model's continuations of exactly those ids, and one line says how many prompts were cut."""
    from tunesmith.data.dataset import load_conversations
    from tunesmith.data.encode import IGNORE_INDEX, encode_sft
    from tunesmith.inference.engine import Engine

    (Path(settings["dataset_dir"]) / "tiny.json").write_text(json.dumps(CUT_RECORDS))
    cut = {**settings, "cutoff_len": 40}
    said = []
    train_and_predict(build_config(cut), say=said.append)
    lines = [json.loads(line) for line in (Path(cut["output_dir"]) / PREDICTIONS_FILE).read_text().splitlines()]
    engine = Engine.load(build_config(cut))
    conversations = load_conversations("tiny", cut["dataset_dir"])
    kept, whole = [], []
    for messages in conversations:  # training's encoding of the same record: its prompt part is what is kept
        encoded = encode_sft(messages, engine.template, engine.tokenizer, cutoff_len=40)
        kept.append(encoded["input_ids"][:encoded["labels"].count(IGNORE_INDEX)])
        whole.append(engine.prompt_ids(messages[:-1]))
    assert [len(ids) < len(full) for ids, full in zip(kept, whole)] == [True, False, True, False]
    assert all(ids == full[:len(ids)] for ids, full in zip(kept, whole))  # the head is kept
    assert [line["prompt"] for line in lines] == [engine.decode(ids) for ids in kept]
    assert lines[1]["prompt"] == engine.decode(whole[1]) and lines[3]["prompt"] == engine.decode(whole[3])
    assert [line["label"] for line in lines] == [r["output"] for r in CUT_RECORDS]
    alone = [engine.decode(engine.continue_ids([ids], engine.sampling).response_ids[0]) for ids in kept]
    assert [line["predict"] for line in lines] == alone
    notices = [line for line in said if "cutoff_len" in line]
    lengths = sorted({len(kept[0]), len(kept[2])})
    assert notices == [f"[tunesmith] 2 of 4 eval prompts do not fit cutoff_len=40 with their label: each keeps "
                       f"its first {'-'.join(map(str, lengths))} tokens, as training cuts them (infer_seqlen)"]
