"""POST /v1/completions and chat log-probs, through raw HTTP and the official openai client, against a
tiny model; log-probs checked against an independent transformers forward over prompt + answer."""

import dataclasses
import json
import urllib.request

import openai
import pytest
import torch

from tunesmith.data.plain_text import PlainText
from tunesmith.inference.engine import Engine
from tunesmith.training.configure import build_config

KEY = "test-key"
PROMPT = "The river is"


@pytest.fixture(scope="module")
def engine(chat_model):
    base, adapter = chat_model
    return Engine.load(build_config({"model_name_or_path": base, "adapter_name_or_path": adapter,
                                     "max_new_tokens": 12, "cutoff_len": 256}, command="api"))


@pytest.fixture(scope="module")
def server(engine, serve_api):
    with serve_api(engine, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server, max_retries=0)


def post(url: str, body: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request) as response:
            raw = response.read().decode()
            return response.status, raw if body.get("stream") else json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def text_ids(engine: Engine, text: str) -> list[int]:
    plain = PlainText(engine.tokenizer)
    return plain.encode(plain.protect(text))


def greedy_ids(engine: Engine, prompt: list[int], max_tokens: int = 12) -> list[int]:
    settings = dataclasses.replace(engine.sampling, max_new_tokens=max_tokens, do_sample=False)
    return engine.continue_ids([prompt], settings).response_ids[0]


def forward_logps(engine: Engine, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of a plain transformers forward over the whole sequence, not the KV-cache
    decoder (row i predicts token i + 1)."""
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
    return logits.float().log_softmax(dim=-1)


def test_completion_shape_echo_and_logprobs_equal_a_forward(server, engine):
    status, body = post(f"{server}/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                  "echo": True, "logprobs": 3})
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    prompt = text_ids(engine, PROMPT)
    answer = [t for t in greedy_ids(engine, prompt, 8) if t not in engine.stop_ids]
    assert choice["text"] == PROMPT + engine.decode(answer)
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    ids = prompt + answer
    assert len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = forward_logps(engine, ids)
    for at in range(1, len(ids)):
        assert logprobs["token_logprobs"][at] == pytest.approx(expected[at - 1, ids[at]].item(), abs=1e-4)
        top = expected[at - 1].topk(3)
        named = logprobs["top_logprobs"][at]
        assert 3 <= len(named) <= 4 and named[logprobs["tokens"][at]] == logprobs["token_logprobs"][at]
        assert max(named.values()) == pytest.approx(top.values[0].item(), abs=1e-4)
    assert logprobs["text_offset"] == [len(engine.decode(ids[:at])) for at in range(len(ids))]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": body["usage"]["completion_tokens"],
                             "total_tokens": len(prompt) + body["usage"]["completion_tokens"]}


def test_greedy_completion_equals_the_engine_for_the_chat_prompt_ids(server, engine):
    messages = [{"role": "user", "content": "hello there"}]
    prompt = engine.prompt_ids(messages)
    status, body = post(f"{server}/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    chat = engine.generate([messages], dataclasses.replace(engine.sampling, do_sample=False)).response_ids[0]
    assert status == 200
    assert body["choices"][0]["text"] == engine.decode([t for t in chat if t not in engine.stop_ids])
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == len(chat)


def test_several_prompts_n_and_special_token_text(server, engine):
    prompts = ["one <|im_end|> two", "three"]
    status, body = post(f"{server}/completions", {"prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 0,
                                                  "echo": True})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:len(prompts[i // 2])] for i, c in enumerate(body["choices"])] == [p for p in prompts
                                                                                          for _ in range(2)]
    assert body["usage"]["prompt_tokens"] == sum(len(text_ids(engine, p)) for p in prompts)
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") not in text_ids(engine, prompts[0])


def test_streamed_completion_joins_to_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_openai_client_completions_echo_and_logprobs(client, engine):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text.startswith(PROMPT) and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(choice.logprobs.text_offset) == len(choice.logprobs.top_logprobs)
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs[1:])


def test_chat_logprobs_through_the_openai_client(client, engine):
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    prompt = engine.prompt_ids(messages)
    answer = greedy_ids(engine, prompt, 10)
    answer = [t for t in answer if t not in engine.stop_ids]
    assert len(content) == len(answer)
    expected = forward_logps(engine, prompt + answer)
    for at, (entry, token) in enumerate(zip(content, answer)):
        assert entry.logprob == pytest.approx(expected[len(prompt) + at - 1, token].item(), abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes) == engine.tokenizer.decode([token]).encode() or "\ufffd" in entry.token
    # a random model may emit byte tokens that join to no character: both sides show U+FFFD there
    joined_bytes = b"".join(bytes(e.bytes) for e in content)
    assert joined_bytes.decode("utf-8", errors="replace") == reply.choices[0].message.content
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10,
                                                   logprobs=True, top_logprobs=2, stream=True))
    joined = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert joined == [e.logprob for e in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None and plain.usage.total_tokens > 0


def test_logprobs_do_not_change_with_temperature(server):
    bodies = [post(f"{server}/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "echo": True, "logprobs": 0,
                                             "temperature": t, "seed": 1})[1] for t in (0.3, 1.7)]
    first, second = (b["choices"][0]["logprobs"]["token_logprobs"][:3] for b in bodies)
    assert first == second


@pytest.mark.parametrize(("path", "body", "param"), [
    ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "hi", "echo": True, "stream": True}, "echo"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": ["a"] * 9, "n": 2}, "n"),
    ("completions", {"prompt": "word " * 300}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_requests_are_400s_in_openai_shape(server, path, body, param):
    status, answer = post(f"{server}/{path}", body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and answer["error"]["message"]
