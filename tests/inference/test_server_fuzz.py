"""`tunesmith api` under malformed requests: each gets a 4xx in OpenAI's error shape, none is a 500 or
carries a traceback or an exception's repr, and the server still answers a normal request afterwards."""

import http.client
import json

import pytest

from tunesmith.inference.engine import Engine
from tunesmith.training.configure import build_config

KEY = "fuzz-key"
HI = [{"role": "user", "content": "hi"}]


def body(**fields) -> bytes:
    return json.dumps({"messages": HI, **fields}).encode()


BAD_BODIES = {
    "invalid JSON": b'{"messages": [',
    "empty body": b"",
    "a list": b"[]",
    "null": b"null",
    "a string": b'"messages"',
    "messages a string": json.dumps({"messages": "hi"}).encode(),
    "messages empty": json.dumps({"messages": []}).encode(),
    "message a number": json.dumps({"messages": [1]}).encode(),
    "message without content": json.dumps({"messages": [{"role": "user"}]}).encode(),
    "content null": json.dumps({"messages": [{"role": "user", "content": None}]}).encode(),
    "content an object": json.dumps({"messages": [{"role": "user", "content": {"text": "hi"}}]}).encode(),
    "content part without text": json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).encode(),
    "content part a number": json.dumps({"messages": [{"role": "user", "content": [7]}]}).encode(),
    "unknown role": json.dumps({"messages": [{"role": "tool", "content": "hi"}]}).encode(),
    "role a list": json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}).encode(),
    "ends with the answer": json.dumps({"messages": [*HI, {"role": "assistant", "content": "yo"}]}).encode(),
    "max_tokens -1": body(max_tokens=-1),
    "max_tokens 10**30": body(max_tokens=10**30),
    "max_tokens a string": body(max_tokens="x"),
    "max_tokens a float": body(max_tokens=1.5),
    "max_completion_tokens 0": body(max_completion_tokens=0),
    "temperature NaN": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "temperature Infinity": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    "temperature a string": body(temperature="x"),
    "temperature -1": body(temperature=-1),
    "top_p 0": body(top_p=0),
    "top_p NaN": b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
    "n 0": body(n=0),
    "n 10**30": body(n=10**30),
    "seed 2**80": body(seed=2**80),
    "seed -2**80": body(seed=-(2**80)),
    "seed a string": body(seed="x"),
    "stop five strings": body(stop=["a", "b", "c", "d", "e"]),
    "stop empty": body(stop=[""]),
    "stop a number": body(stop=[1]),
    "stream a list": body(stream=[1]),
    "stream_options a string": body(stream_options="x"),
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "thousands of messages": json.dumps({"messages": [{"role": ("user", "assistant")[i % 2], "content": "x"}
                                                      for i in range(3001)]}).encode(),
    "a long conversation over cutoff_len": json.dumps({"messages": [
        {"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(501)]}).encode(),
    "deeply nested JSON": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deeply nested objects": b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 50_000 + b"1"
                             + b"}" * 50_000 + b"}]}",
    "unknown fields and bad messages": json.dumps({"messages": 5, "frobnicate": True, "logit_bias": {"1": 2}}).encode(),
}


@pytest.fixture(scope="module")
def server(chat_model, serve_api):
    base, adapter = chat_model
    engine = Engine.load(build_config({"model_name_or_path": base, "adapter_name_or_path": adapter,
                                       "max_new_tokens": 4, "cutoff_len": 128}, command="api"))
    with serve_api(engine, KEY) as url:
        yield url.split("//")[1].split("/")[0]


def send(address: str, path: str, data: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, data, {"Content-Type": content_type, "Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_openai_error(status: int, raw: bytes) -> None:
    assert 400 <= status < 500, (status, raw[:300])
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error", error
    for leak in ("Traceback", 'File "', "Error(", "Exception("):
        assert leak not in error["message"], error


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_a_malformed_chat_request_is_a_4xx_in_openai_shape(server, case):
    assert_openai_error(*send(server, "/v1/chat/completions", BAD_BODIES[case]))


@pytest.mark.parametrize("data", [b"{", b"[[1]]", b'{"messages": [[{"role": "user"}]]}', b'{"messages": 3}'])
def test_a_malformed_score_request_is_a_4xx_in_openai_shape(server, data):
    assert_openai_error(*send(server, "/v1/score", data))


def test_other_content_types_and_methods_are_4xx_in_openai_shape(server):
    assert_openai_error(*send(server, "/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded"))
    assert_openai_error(*send(server, "/v1/nowhere", b"{}"))


def test_the_server_still_answers_and_ignores_unknown_fields(server):
    for case in ("invalid JSON", "deeply nested JSON", "lone surrogate", "seed 2**80"):
        send(server, "/v1/chat/completions", BAD_BODIES[case])
    status, raw = send(server, "/v1/chat/completions", body(max_tokens=2, frobnicate={"x": [1]}, user="me"))
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"
