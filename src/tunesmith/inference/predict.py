"""`do_predict`: answer every prompt of eval_dataset and score the answers against the dataset's own.

Each eval record (in file order, at most max_samples per dataset) is a conversation; the model answers
all of it but the last assistant turn, and that turn is the reference. Two files land in output_dir,
named and shaped as LLaMA-Factory writes them, so its users' scripts read them unchanged:
- generated_predictions.jsonl: {"prompt", "predict", "label"} per record. The prompt is the rendered
  chat prompt decoded without special tokens; predict is the answer without its stop token.
- predict_results.json: predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l (the mean over
  records of `text_metrics.similarity_scores`, in percent), predict_runtime (seconds, scoring included),
  predict_samples_per_second, predict_steps_per_second.

Prompts go in batches of per_device_eval_batch_size (left-padded; each row answers as it would alone)
with the config's generation settings (`do_sample: false` is greedy), sampling seeded by `seed`.
Left out on purpose: cutting prompts to cutoff_len (LLaMA-Factory keeps a long prompt's head, which can
drop the question; here a prompt is used whole) and splitting the work over processes (rank 0 predicts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.algorithms.text_metrics import similarity_scores
from tunesmith.config import RunConfig, SamplingSettings
from tunesmith.data.dataset import load_conversations
from tunesmith.inference.engine import Engine, trained_folder
from tunesmith.inference.served_models import with_recorded_template
from tunesmith.training.distributed import process_info
from tunesmith.training.run import check_output_dir, run_training, trained_model_config, write_results

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


@dataclass(frozen=True)
class Prediction:
    """One line of generated_predictions.jsonl (LLaMA-Factory's field names)."""

    prompt: str
    predict: str
    label: str


def train_and_predict(config: RunConfig, say: Callable[[str], None] = print) -> dict:
    """`tunesmith train`: train (do_train), then, with do_predict, answer eval_dataset's prompts with a fresh
    load of what training wrote (so the predictions equal a later `do_train: false` run's on that folder)."""
    output_dir = Path(config.output.output_dir)
    if config.task.do_train:
        metrics = run_training(config, say)
    else:
        check_output_dir(output_dir, config, None)
        metrics = {}
    if config.task.do_predict and process_info().is_main:
        model_config = trained_model_config(config) if config.task.do_train else config
        metrics = {**metrics, **run_prediction(model_config, say)}
        write_results(output_dir, metrics)
    return metrics


def run_prediction(config: RunConfig, say: Callable[[str], None] = print) -> dict:
    """Predict eval_dataset with the model `config` names; writes both files and returns the metrics."""
    data, batch_size = config.data, config.train.per_device_eval_batch_size
    conversations = load_conversations(data.eval_dataset, data.dataset_dir, data.max_samples,
                                       data.skip_bad_records)  # data errors before the slow model load
    folder = trained_folder(config.model)
    engine = with_recorded_template(Engine.load(config), config.data.template, folder, folder.name, say)
    say(f"[tunesmith] predicting {len(conversations)} eval rows of {','.join(data.eval_dataset)} on "
        f"{next(engine.model.parameters()).device}")
    started = time.perf_counter()
    predictions = predict(engine, conversations, engine.sampling, batch_size, config.train.seed)
    scores = [similarity_scores(p.predict, p.label) for p in predictions]
    runtime = time.perf_counter() - started
    batches = -(-len(predictions) // batch_size)
    metrics = {f"predict_{name}": sum(s[name] for s in scores) / len(scores) for name in scores[0]}
    metrics.update(predict_runtime=round(runtime, 4),
                   predict_samples_per_second=round(len(predictions) / runtime, 3),
                   predict_steps_per_second=round(batches / runtime, 3))
    output_dir = Path(config.output.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions)
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def predict(engine: Engine, conversations: list[list[dict]], settings: SamplingSettings, batch_size: int,
            seed: int) -> list[Prediction]:
    """The model's answer to each conversation minus its last (assistant) turn, which is the label."""
    device = next(engine.model.parameters()).device
    generator = None if settings.greedy else torch.Generator(device).manual_seed(seed)
    predictions = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="predict", dynamic_ncols=True):
        batch = conversations[start:start + batch_size]
        prompts = [messages[:-1] for messages in batch]
        generation = engine.generate(prompts, settings, generator=generator)
        for prompt, messages, response_ids in zip(prompts, batch, generation.response_ids):
            predictions.append(Prediction(prompt=engine.decode(engine.prompt_ids(prompt)),
                                          predict=engine.decode(response_ids), label=messages[-1]["content"]))
    return predictions
