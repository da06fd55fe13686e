"""`tunesmith api` under malformed requests: each gets a 4xx in OpenAI's error shape, none is a 500 or
carries a traceback or an exception's repr, and the server still answers a normal request afterwards.

Then slow clients on raw sockets: headers that never end, a body trickled or abandoned half-way, a stream
nobody reads, twenty of them at once. Normal requests answer within PROMPT seconds during and after, a
stalled body is a 408 at the body deadline (shortened here to BODY_SECONDS), and once the clients close
no request is left in flight on the server."""

import http.client
import json
import select
import socket
import time

import pytest

from tunesmith.inference import api_guard
from tunesmith.inference.engine import Engine
from tunesmith.training.configure import build_config

KEY = "fuzz-key"
BODY_SECONDS = 2.0  # the server's deadline for a request body, a minute in `tunesmith api`
PROMPT = 5  # seconds a normal request may take while slow clients hang on
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
def served(chat_model, serve_api):
    """The served URL, its uvicorn server at `.server`, with the body deadline at BODY_SECONDS."""
    base, adapter = chat_model
    engine = Engine.load(build_config({"model_name_or_path": base, "adapter_name_or_path": adapter,
                                       "max_new_tokens": 4, "cutoff_len": 256}, command="api"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api_guard, "BODY_SECONDS", BODY_SECONDS)
        with serve_api(engine, KEY) as url:
            yield url


@pytest.fixture(scope="module")
def server(served) -> str:
    """host:port"""
    return served.split("//")[1].split("/")[0]


def send(address: str, path: str, data: bytes, content_type: str = "application/json",
         timeout: float = 60) -> tuple[int, bytes]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
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


def answers_normally(address: str) -> None:
    """GET /v1/models and a two-token chat completion each answer within PROMPT seconds."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=PROMPT)
    try:
        connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["data"]
    finally:
        connection.close()
    status, raw = send(address, "/v1/chat/completions", body(max_tokens=2), timeout=PROMPT)
    assert status == 200, raw


def connect(address: str, receive_buffer: int | None = None) -> socket.socket:
    """A raw client socket; a small `receive_buffer` makes a client that does not read push back soon."""
    host, port = address.split(":")
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each piece leaves on its own
    sock.settimeout(PROMPT)
    sock.connect((host, int(port)))
    return sock


def head(length: int) -> bytes:
    """A chat request's headers, up to the blank line that ends them, for a body of `length` bytes."""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def in_flight(served) -> int:
    """Requests the server is still working on (uvicorn's request tasks)."""
    return len(served.server.server_state.tasks)


def wait_for(condition, until: float, what: str) -> None:
    while not condition():
        assert time.monotonic() < until, what
        time.sleep(0.01)


def test_headers_sent_a_few_bytes_at_a_time_hold_nobody_up(served, server):
    with connect(server) as sock:
        for start in range(0, 30, 3):  # the headers never end
            sock.sendall(head(100)[start:start + 3])
            answers_normally(server)
    wait_for(lambda: in_flight(served) == 0, time.monotonic() + PROMPT, "work left after the client closed")
    answers_normally(server)


def test_a_trickled_body_is_a_408_in_openai_shape_and_its_connection_closed(server):
    data = body(max_tokens=2, user="x" * 4000)  # longer than the trickle gets before the deadline
    with connect(server) as sock:
        sock.sendall(head(len(data)))
        sent, stop_sending = 0, time.monotonic() + BODY_SECONDS - 0.5
        # trickle until shortly before the deadline, then only wait: a byte the server never reads would make
        # its close a reset, which can destroy the answer before this client reads it
        while time.monotonic() < stop_sending and not select.select([sock], [], [], 0)[0]:
            sock.sendall(data[sent:sent + 1])
            sent += 1
            answers_normally(server)
        assert select.select([sock], [], [], PROMPT + 0.5)[0], "no answer to a stalled body"
        assert sent < len(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.getheader("connection") == "close"
        assert_openai_error(response.status, response.read())
        assert response.status == 408
        assert sock.recv(1) == b""
    answers_normally(server)


def test_a_half_sent_body_its_client_closes_leaves_no_work(served, server):
    data = body(max_tokens=2)
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(head(len(data)) + data[:len(data) // 2])
        wait_for(lambda: in_flight(served) == 1, started + PROMPT, "the request never started")
    # ended by the client's close, well before the body deadline could end it
    wait_for(lambda: in_flight(served) == 0, started + BODY_SECONDS / 2, "work left after the client closed")
    answers_normally(server)


def test_a_stream_its_client_does_not_read_holds_nobody_up(served, server):
    # ~6 MB of events: more than the kernel buffers hold (Linux's send buffer grows to 4 MB), so the
    # server is left holding what this client does not read
    data = body(stream=True, max_tokens=224, n=16, logprobs=True, top_logprobs=20)
    with connect(server, receive_buffer=4096) as sock:
        sock.sendall(head(len(data)) + data)
        select.select([sock], [], [], PROMPT)  # the stream began: the chat below waits for its generation
        answers_normally(server)
        answers_normally(server)
        response = http.client.HTTPResponse(sock)
        response.begin()
        events = response.read().decode()
    assert response.status == 200 and events.endswith("data: [DONE]\n\n") and '"error"' not in events
    wait_for(lambda: in_flight(served) == 0, time.monotonic() + PROMPT, "work left after the stream")
    answers_normally(server)


def test_twenty_slow_clients_at_once_hold_nobody_up(served, server):
    data, stream = body(max_tokens=2), body(stream=True)
    clients = [connect(server, receive_buffer=4096) for _ in range(20)]
    try:
        for i, sock in enumerate(clients):
            sock.sendall((head(len(data))[:20], head(len(data)) + data[:10], head(len(stream)) + stream)[i % 3])
        answers_normally(server)
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: in_flight(served) == 0, time.monotonic() + PROMPT, "work left after the clients closed")
    answers_normally(server)
