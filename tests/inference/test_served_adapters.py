"""`served_adapters`: several LoRA adapters from one `tunesmith api`, chosen by a request's `model`."""

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.inference.engine import Engine
from tunesmith.inference.served_models import load_served
from tunesmith.model.init_model import init_model
from tunesmith.training.configure import build_config, load_config

KEY = "test-key"
PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def adapters(chat_model, adapter_writer, tmp_path_factory) -> dict[str, str]:
    """{name: folder}: two random adapters on the chat model's base, unlike each other and the default."""
    root = tmp_path_factory.mktemp("served")
    return {name: adapter_writer(chat_model[0], root / name, seed) for name, seed in (("kind", 11), ("polite", 12))}


def config(base: str, default: str | None, served: dict | None = None, **keys) -> object:
    return build_config({"model_name_or_path": base, "adapter_name_or_path": default, "served_adapters": served,
                         "max_new_tokens": 12, "cutoff_len": 128, **keys}, command="api")


def greedy(engine: Engine) -> str:
    settings = dataclasses.replace(engine.sampling, do_sample=False)
    ids = engine.generate([PROMPT], settings).response_ids[0]
    return engine.decode([t for t in ids if t not in engine.stop_ids])


@pytest.fixture(scope="module")
def served(chat_model, adapters):
    return load_served(config(chat_model[0], chat_model[1], adapters))


@pytest.fixture(scope="module")
def server(served):
    import uvicorn

    from tunesmith.inference.server import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(served.default.engine, served.default.name, KEY, served)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ask(url: str, model: str | None) -> str:
    status, body = post(f"{url}/chat/completions", {"model": model, "messages": PROMPT, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_each_model_answers_as_a_server_serving_only_it(server, served, chat_model, adapters):
    """The chosen adapter's weights and nothing else: each answer equals the one-adapter server's."""
    base, default = chat_model
    alone = {name: greedy(load_served(config(base, folder)).default.engine)
             for name, folder in {**adapters, "default": default}.items()}
    assert len(set(alone.values())) == 3, alone
    for _ in range(2):  # switching back and forth leaves nothing behind
        for name in adapters:
            assert ask(server, name) == alone[name]
        assert ask(server, served.default.name) == alone["default"]
    assert ask(server, None) == ask(server, base) == ask(server, "base") == alone["default"]  # base: its folder name
    assert greedy(served.default.engine) == alone["default"]  # between requests the default runs


def test_concurrent_requests_of_every_model_share_batches_and_answer_as_alone(server, served, chat_model, adapters):
    """Streaming clients of the three models at once, greedy and sampled: their rows decode in the same passes
    (each adding its own adapter's update), and every greedy answer equals the request sent alone. (A sampled
    row draws from its own seeded generator, but a batch's matmuls round differently from one row's, and a
    draw that falls within rounding of a token's boundary can part: exact only greedily.)"""
    models = [served.default.name, *adapters]
    asks = [(model, temperature, seed) for model in models for temperature, seed in ((0, None), (1.2, 7), (0.8, 3))]

    def streamed(model, temperature, seed):
        client = openai.OpenAI(api_key=KEY, base_url=server, max_retries=0)
        stream = client.chat.completions.create(model=model, messages=PROMPT, temperature=temperature, seed=seed,
                                                max_tokens=12, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    one_by_one = [streamed(*args) for args in asks]
    widest = []
    scheduler = served.default.engine.scheduler
    watcher = threading.Thread(target=lambda: [widest.append(len(scheduler.rows)) or time.sleep(0.002)
                                               for _ in range(2000)], daemon=True)
    results = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, streamed(*asks[i]))) for i in range(len(asks))]
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    greedy_asks = [i for i, (_, temperature, _) in enumerate(asks) if temperature == 0]
    assert [results[i] for i in greedy_asks] == [one_by_one[i] for i in greedy_asks]
    assert all(results)
    assert len({one_by_one[i] for i in greedy_asks}) == 3  # the models really differ
    assert max(widest) > 1  # requests ran side by side


def test_models_listing_and_the_openai_client(server, served, adapters):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    assert [m.id for m in client.models.list().data] == [served.default.name, "kind", "polite"]
    reply = client.chat.completions.create(model="polite", messages=PROMPT, temperature=0)
    assert reply.model == "polite" and reply.choices[0].message.content == ask(server, "polite")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="rude", messages=PROMPT)


def test_unknown_model_is_openais_404(server):
    status, body = post(f"{server}/chat/completions", {"model": "rude", "messages": PROMPT})
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "`rude`" in body["error"]["message"] and "kind" in body["error"]["message"]


def test_command_line_comma_form(tmp_path, chat_model, adapters):
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": chat_model[0]}))
    override = f"served_adapters=kind={adapters['kind']},polite={adapters['polite']}"
    assert load_config(path, [override], command="api").model.served_adapters == adapters
    path.write_text(yaml.safe_dump({"model_name_or_path": chat_model[0], "served_adapters": adapters}))
    assert load_config(path, command="api").model.served_adapters == adapters
    with pytest.raises(TunesmithError, match="`served_adapters` must be a mapping"):
        load_config(path, ["served_adapters=kind"], command="api")


def test_bad_names_and_folders_are_config_errors(chat_model, adapters, tmp_path):
    base = chat_model[0]
    with pytest.raises(TunesmithError, match="served adapter `gone`: folder .* does not exist"):
        config(base, None, {"gone": str(tmp_path / "gone")})
    with pytest.raises(TunesmithError, match="no name"):
        config(base, None, {"": adapters["kind"]})
    with pytest.raises(TunesmithError, match="served adapter `base` has the name of the default model or the base"):
        config(base, None, {"base": adapters["kind"]})


def test_an_adapter_of_another_base_is_refused(chat_model, adapter_writer, tmp_path):
    other = str(init_model(tmp_path / "other", arch="qwen2", size="tiny", seed=5))  # same shapes, other weights
    stranger = adapter_writer(other, tmp_path / "stranger", 13)
    with pytest.raises(TunesmithError, match=r"served adapter `stranger` \(.*\): it was trained on .*other"):
        load_served(config(chat_model[0], None, {"stranger": stranger}))
    bigger = str(init_model(tmp_path / "bigger", arch="qwen2", size="small", seed=5))
    wide = adapter_writer(bigger, tmp_path / "wide", 14)
    with pytest.raises(TunesmithError, match=r"served adapter `wide`"):
        load_served(config(chat_model[0], None, {"wide": wide}, template="chatml"))


def test_templates_recorded_at_training(chat_model, adapter_writer, tmp_path):
    """No `template`: each model uses the one its train_config.yaml records; a different configured one wins
    with a warning naming both."""
    base = chat_model[0]
    folders = {}
    for name, template, seed in (("qwenish", "qwen", 21), ("plain", "chatml", 22)):
        folders[name] = adapter_writer(base, tmp_path / name, seed)
        (tmp_path / name / "train_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": base,
                                                                            "template": template}))
    lines = []
    served = load_served(config(base, folders["qwenish"], {"plain": folders["plain"]}), lines.append)
    assert served.default.engine.template.name == "qwen" and served.adapters["plain"].engine.template.name == "chatml"
    assert lines == []
    served = load_served(config(base, folders["qwenish"], {"plain": folders["plain"]}, template="chatml"), lines.append)
    assert {served.default.engine.template.name, served.adapters["plain"].engine.template.name} == {"chatml"}
    assert lines == ["[tunesmith] warning: qwenish was trained with template qwen, but the config sets template "
                     "chatml; serving it with chatml."]


def test_completions_use_the_named_adapter(server, served, adapters):
    client = openai.OpenAI(api_key=KEY, base_url=server)
    prompt = served.default.engine.decode(served.default.engine.prompt_ids(PROMPT))
    texts = {name: client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
             for name in [served.default.name, *adapters]}
    assert len(set(texts.values())) == 3, texts  # each adapter's own weights
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rude", prompt=prompt, max_tokens=2)


def test_chat_and_predict_use_the_recorded_template(chat_model, adapter_writer, tmp_path, monkeypatch):
    """`tunesmith chat` on an adapter trained with `template: qwen` and a config naming none chats in qwen
    (the issue's "7 plus 10 is 17." turned "3 4 said iron." when the template silently differed)."""
    import io

    from tunesmith.inference import chat

    base = chat_model[0]
    folder = adapter_writer(base, tmp_path / "qwen_trained", 23)
    (tmp_path / "qwen_trained" / "train_config.yaml").write_text(yaml.safe_dump({"template": "qwen"}))
    used = []
    monkeypatch.setattr(chat, "stream_answer", lambda engine, history, out: used.append(engine.template.name) or "")
    chat_config = build_config({"model_name_or_path": base, "adapter_name_or_path": folder}, command="chat")
    chat.run_chat(chat_config, stdin=io.StringIO("hi\nexit\n"), stdout=io.StringIO())
    assert used == ["qwen"]
