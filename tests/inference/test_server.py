"""`tunesmith api`: the official openai client against a server started on a free local port."""

import dataclasses
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from tunesmith.inference.engine import Engine
from tunesmith.model.reward_model import RewardModel
from tunesmith.training.configure import build_config
from tunesmith.training.rewards import Scored, http_rewards

KEY = "test-key"


@pytest.fixture(scope="module")
def engine(chat_model):
    base, adapter = chat_model
    return Engine.load(build_config({"model_name_or_path": base, "adapter_name_or_path": adapter,
                                     "max_new_tokens": 16, "cutoff_len": 256}, command="api"))


@pytest.fixture(scope="module")
def server(engine, serve_api):
    with serve_api(engine, KEY) as url:
        yield url


def greedy_text(engine: Engine, content: str, max_tokens: int = 16) -> str:
    settings = dataclasses.replace(engine.sampling, max_new_tokens=max_tokens, do_sample=False)
    ids = engine.generate([[{"role": "user", "content": content}]], settings).response_ids[0]
    return engine.decode([t for t in ids if t not in engine.stop_ids])


def post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ask(client, content, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def test_models_completion_and_usage(server, engine):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = ask(client, "hello there", temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == greedy_text(engine, "hello there")
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(engine.prompt_ids([{"role": "user", "content": "hello there"}]))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens > prompt_tokens


def test_streaming_equals_the_plain_answer(server, engine):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    chunks = list(ask(client, "hello there", temperature=0, max_tokens=16, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(engine, "hello there")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].usage.completion_tokens > 0


def test_n_choices_seed_and_stop_strings(server, engine):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    sampled = ask(client, "tell me", n=3, temperature=1.0, seed=5, max_tokens=8)
    again = ask(client, "tell me", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert len(sampled.choices) == 3
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    full = greedy_text(engine, "hello there")
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, "hello there", temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, "hello there", temperature=0, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]


def test_concurrent_requests_never_mix(server, engine):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    prompts = [f"question {i} about the garden" for i in range(6)]
    results = {}

    def run(prompt):
        results[prompt] = ask(client, prompt, temperature=0, max_tokens=16).choices[0].message.content

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {p: greedy_text(engine, p) for p in prompts}


def test_errors_use_openai_shape(server, engine):
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(api_key="wrong", base_url=server), "hi")
    client = openai.OpenAI(api_key=KEY, base_url=server, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "word " * 300)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n must be"):
        ask(client, "hi", n=50)
    status, body = post(f"{server}/chat/completions", {"messages": "not a list"})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(f"{server}/score", {"messages": []})
    assert status == 400 and "not a reward model" in body["error"]["message"]
    status, body = post(f"{server}/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"


@pytest.fixture
def steps(monkeypatch):
    """One entry per token any row draws from here on (the rows Engine.requests makes counted)."""
    counted_steps = []
    real_requests = Engine.requests

    def counting_requests(self, prompts, settings, num_samples=1, seed=None, on_token=None, **options):
        def counted(row, token):
            counted_steps.append(1)
            return on_token(row, token) if on_token is not None else None
        return real_requests(self, prompts, settings, num_samples, seed, on_token=counted, **options)

    monkeypatch.setattr(Engine, "requests", counting_requests)
    return counted_steps


def wait_idle(engine, timeout=20.0):
    """Until the decode scheduler runs no row (every request ended, cancelled or not)."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.rows or engine.scheduler.waiting:
        assert time.monotonic() < deadline, "rows still decoding"
        time.sleep(0.02)


def test_a_client_that_leaves_mid_stream_frees_its_row(server, engine, steps):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
            "temperature": 1.0, "stream": True}
    host, port = server.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    connection.close()  # the client leaves after the first event
    client = openai.OpenAI(api_key=KEY, base_url=server)
    assert ask(client, "hello there", temperature=0, max_tokens=4).choices[0].message.content is not None
    wait_idle(engine)  # the abandoned answer ended early, not after its 200 tokens
    assert len(steps) < 100


def test_reward_model_scores_over_http_as_ppo_expects(reward_adapter, chat_model, serve_api):
    engine = Engine.load(build_config({"model_name_or_path": chat_model[0], "adapter_name_or_path": reward_adapter},
                                      command="api"))
    with serve_api(engine, None) as url:
        conversations = [[{"role": "user", "content": "Describe the river."}, {"role": "assistant", "content": a}]
                         for a in ("The river is calm.", "The river is cold.")]
        status, body = post(f"{url}/score", {"messages": conversations}, key=None)
        scores = body["scores"]
        expected = RewardModel.load(reward_adapter).score(conversations)
        assert scores == pytest.approx(expected, abs=1e-5)
        source = http_rewards(f"{url}/score")  # PPO's `reward_model: http://...` source
        items = [Scored([{"role": "user", "content": "Describe the river."}], a, None)
                 for a in ("The river is calm.", "The river is cold.")]
        assert source(items) == pytest.approx(expected, abs=1e-5)
        status, body = post(f"{url}/score", {"messages": [[{"role": "user", "content": "hi"}]]}, key=None)
        assert status == 400 and "must end with the assistant answer" in body["error"]["message"]


def test_a_full_queue_is_a_429_for_streams_too(server, monkeypatch):
    from tunesmith.inference import server as server_module

    def busy(self, job):
        raise server_module.ApiError(429, "busy", "rate_limit_error")

    monkeypatch.setattr(server_module.Worker, "submit", busy)
    client = openai.OpenAI(api_key=KEY, base_url=server, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError):
            ask(client, "hi", stream=stream)


def test_the_worker_bounds_jobs_and_survives_cancelled_and_failing_ones():
    from tunesmith.inference.server import ApiError, Job, Worker

    worker = Worker(limit=3)
    gate = threading.Event()
    blockers = [worker.submit(Job(lambda cancelled: gate.wait(5))) for _ in range(3)]
    with pytest.raises(ApiError) as busy:  # three run or wait: a fourth is refused at once
        worker.submit(Job(lambda cancelled: "refused"))
    assert busy.value.status == 429
    gate.set()
    assert [job.future.result(timeout=5) for job in blockers] == [True] * 3
    abandoned = Job(lambda cancelled: "never")
    abandoned.future.cancel()  # what asyncio does to a future whose awaiting task is cancelled
    worker.submit(abandoned)
    failing = worker.submit(Job(lambda cancelled: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        failing.future.result(timeout=5)
    assert worker.submit(Job(lambda cancelled: "alive")).future.result(timeout=5) == "alive"


def test_openai_forms_clients_send(server, engine):
    client = openai.OpenAI(api_key=KEY, base_url=server, max_retries=0)
    parts = client.chat.completions.create(model="tiny", temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == greedy_text(engine, "hello\nthere")
    developer = client.chat.completions.create(model="tiny", temperature=0, max_tokens=4, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    system = client.chat.completions.create(model="tiny", temperature=0, max_tokens=4, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    status, body = post(f"{server}/chat/completions", {"messages": [{"role": "user", "content": image}]})
    assert status == 400 and body["error"]["param"] == "messages[0].content[1]" and "image_url" in body["error"]["message"]
    request = urllib.request.Request(f"{server}/chat/completions", data=json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200


def test_roles_that_do_not_alternate_reach_the_model_whole(server, engine):
    messages = [{"role": "assistant", "content": "Bravo"}, {"role": "user", "content": "Alpha"},
                {"role": "user", "content": "Charlie"}]
    status, body = post(f"{server}/chat/completions", {"messages": messages, "max_tokens": 2})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(engine.prompt_ids(messages))
    text = engine.tokenizer.decode(engine.prompt_ids(messages))
    assert [text.count(word) for word in ("Bravo", "Alpha", "Charlie")] == [1, 1, 1]
    assert text.index("Bravo") < text.index("Alpha") < text.index("Charlie")
    misplaced = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]
    status, body = post(f"{server}/chat/completions", {"messages": misplaced})
    assert status == 400 and "messages[1]" in body["error"]["message"]


def test_client_errors_are_400s_without_internals(server):
    for body in ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**80},
                 {"messages": [{"role": "user", "content": "\ud800"}]}):
        status, answer = post(f"{server}/chat/completions", body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        assert "Error(" not in answer["error"]["message"] and "Traceback" not in answer["error"]["message"]


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(server):
    host, port = server.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                        ("Transfer-Encoding", "chunked")):
        connection.putheader(name, value)
    connection.endheaders()
    chunk = b'{"messages": "' + b"x" * 2**20
    try:
        for _ in range(5):  # 5 MB and no final chunk: the server must answer without the end of the body
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    assert response.status == 413 and set(json.loads(response.read())["error"]) == {"message", "type", "param", "code"}
    connection.close()


def test_a_waiting_client_that_leaves_frees_its_row(server, engine, steps, monkeypatch):
    # every token is sampled and none ends the answer: only a cancel stops it before 200 steps
    monkeypatch.setattr(Engine, "stop_ids", property(lambda self: []))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200}
    host, port = server.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    while not steps:  # the job has started
        time.sleep(0.01)
    connection.close()
    client = openai.OpenAI(api_key=KEY, base_url=server)
    assert ask(client, "hello there", temperature=0, max_tokens=4).choices[0].message.content is not None
    wait_idle(engine)
    assert len(steps) < 100 + 4


def test_listening_beyond_loopback_without_a_key_warns():
    from tunesmith.inference.server import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("0.0.0.0", "secret") is None
    assert "WARNING" in exposure_warning("0.0.0.0", None) and "WARNING" in exposure_warning("192.168.1.5", None)


def test_a_request_asks_for_no_more_answers_than_decode_together():
    """n (times the prompts) above max_num_seqs is a 400 before anything streams, not an error mid-stream."""
    from types import SimpleNamespace

    from tunesmith.config import SamplingSettings
    from tunesmith.inference.api_errors import ApiError
    from tunesmith.inference.api_sampling import SamplingRequest, request_settings

    engine = SimpleNamespace(sampling=SamplingSettings(), cutoff_len=256, scheduler=SimpleNamespace(max_rows=4))
    settings, _ = request_settings(engine, SamplingRequest(n=4), 10, 4)
    assert settings.max_new_tokens == SamplingSettings().max_new_tokens
    for n, rows in ((5, 5), (2, 6)):
        with pytest.raises(ApiError) as refused:
            request_settings(engine, SamplingRequest(n=n), 10, rows)
        assert refused.value.status == 400 and refused.value.param == "n" and "max_num_seqs is 4" in refused.value.message
