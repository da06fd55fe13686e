"""`do_predict`: answer every prompt of eval_dataset and score the answers against the dataset's own.

Each eval record (in file order, at most max_samples per dataset) is a conversation; the model answers
all of it but the last assistant turn, and that turn is the reference. Two files land in output_dir,
named and shaped as LLaMA-Factory writes them, so its users' scripts read them unchanged:
- generated_predictions.jsonl: {"prompt", "predict", "label"} per record. The prompt is the rendered
  chat prompt decoded without special tokens; predict is the answer without its stop token.
- predict_results.json: predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l (the mean over
  records of `text_metrics.similarity_scores`, in percent), predict_runtime (seconds, scoring included),
  predict_samples_per_second, predict_steps_per_second.

Every prompt goes to the engine's decode scheduler at once, which answers max_num_seqs of them together
and starts the next as one ends (continuous batching; each row answers as it would alone), with the
config's generation settings (`do_sample: false` is greedy); record i samples from a generator seeded
`seed + i`. per_device_eval_batch_size only counts predict_steps_per_second, as LLaMA-Factory counts it.
A prompt is cut to cutoff_len as training cuts it (`cut_prompts`), and as LLaMA-Factory's predict does:
its texts are first clipped as `encode_sft_examples` clips them (`clip_messages`), then `infer_seqlen`
splits cutoff_len between the prompt (every turn before the label, rendered as in chat) and the target,
the label as training encodes it (its ids with the end-of-turn marker), and the prompt keeps its first
`source_len` tokens. A prompt that fits with its label is used whole. The head is kept, so a cut prompt
can lose the question and the assistant turn's opening: the model continues what training would have
seen, and generated_predictions.jsonl holds that cut prompt. One line says how many prompts were cut.
The answer is still bounded by max_new_tokens alone. Left out on purpose: splitting the work over
processes (rank 0 predicts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from tunesmith.algorithms.text_metrics import similarity_scores
from tunesmith.config import RunConfig, SamplingSettings
from tunesmith.data.dataset import load_conversations
from tunesmith.data.encode import clip_messages, infer_seqlen, text_char_limit
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
    predictions = predict(engine, conversations, engine.sampling, config.train.seed, say)
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


def cut_prompts(engine: Engine, conversations: list[list[dict]]) -> tuple[list[list[int]], list[int]]:
    """(each conversation's prompt ids cut as training cuts them, each prompt's length before the cut).

    The prompt is all of the conversation but its last (assistant) turn; the target that `infer_seqlen`
    weighs it against is that turn as training encodes it. Texts are clipped first as training clips them.
    """
    limit = text_char_limit(engine.tokenizer, engine.cutoff_len)
    prompts, lengths = [], []
    for messages in conversations:
        messages = clip_messages(messages, limit)
        prompt_ids = engine.prompt_ids(messages[:-1])
        target_ids = engine.template.encode_turns(engine.tokenizer, messages)[-1][1]
        source_len, _ = infer_seqlen(len(prompt_ids), len(target_ids), engine.cutoff_len)
        prompts.append(prompt_ids[:source_len])
        lengths.append(len(prompt_ids))
    return prompts, lengths


def cut_notice(prompts: list[list[int]], lengths: list[int], cutoff_len: int) -> str | None:
    """The one line saying how many prompts were cut and to how many tokens; None when none was."""
    kept = sorted(len(ids) for ids, length in zip(prompts, lengths) if len(ids) < length)
    if not kept:
        return None
    to = f"{kept[0]}" if kept[0] == kept[-1] else f"{kept[0]}-{kept[-1]}"
    return (f"[tunesmith] {len(kept)} of {len(prompts)} eval prompts do not fit cutoff_len={cutoff_len} with "
            f"their label: each keeps its first {to} tokens, as training cuts them (infer_seqlen)")


def predict(engine: Engine, conversations: list[list[dict]], settings: SamplingSettings,
            seed: int, say: Callable[[str], None] = print) -> list[Prediction]:
    """The model's answer to each conversation minus its last (assistant) turn, which is the label; a prompt
    longer than training would keep is cut (`cut_prompts`) and the model continues the cut ids."""
    prompts, lengths = cut_prompts(engine, conversations)
    notice = cut_notice(prompts, lengths, engine.cutoff_len)
    if notice:
        say(notice)
    # every prompt goes to the decode scheduler at once; it runs max_num_seqs of them together, starting
    # the next as soon as one ends (sampled rows are seeded seed + record index, whatever runs beside them),
    # on this thread (see DecodeScheduler.run_here)
    requests = [engine.requests([ids], settings, seed=seed + index) for index, ids in enumerate(prompts)]
    with tqdm(total=len(requests), desc="predict", dynamic_ncols=True) as bar:
        groups = engine.scheduler.run_here(requests, on_done=lambda index: bar.update())
    predictions = [Prediction(prompt=engine.decode(ids), predict=engine.decode(group.result().response_ids[0]),
                              label=messages[-1]["content"]) for ids, messages, group in zip(prompts, conversations, groups)]
    return predictions
