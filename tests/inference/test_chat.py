"""`tunesmith chat`: scripted through a pipe, it streams the same text the engine generates, keeps the
history, forgets it on `clear`, and survives Ctrl-C during an answer."""

import io

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.inference import chat
from tunesmith.inference.engine import Engine, TextStream, check_messages
from tunesmith.training.configure import build_config


def chat_config(chat_model, **extra):
    base, adapter = chat_model
    return build_config({"model_name_or_path": base, "adapter_name_or_path": adapter, "do_sample": False,
                         "max_new_tokens": 12, **extra}, command="chat")


def answers(transcript: str) -> list[str]:
    return [line.split("Assistant: ", 1)[1] for line in transcript.splitlines() if line.startswith("Assistant: ")]


def greedy_answer(engine: Engine, history: list[dict]) -> str:
    generation = engine.generate([history], engine.sampling)
    response = [t for t in generation.response_ids[0] if t not in engine.stop_ids]
    return engine.decode(response)


def test_piped_chat_streams_keeps_history_and_clears(chat_model):
    config = chat_config(chat_model)
    out = io.StringIO()
    chat.run_chat(config, io.StringIO("hello there\nand the river?\nclear\nhello there\nexit\nnever read\n"), out)
    first, second, after_clear = answers(out.getvalue())
    engine = Engine.load(config)
    assert first == greedy_answer(engine, [{"role": "user", "content": "hello there"}])
    assert second == greedy_answer(engine, [{"role": "user", "content": "hello there"},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "and the river?"}])
    assert after_clear == first  # `clear` forgot the first exchange
    assert "History cleared." in out.getvalue() and "never read" not in out.getvalue()


def test_system_prompt_and_adapter_change_the_answer(chat_model):
    plain, with_system = (Engine.load(chat_config(chat_model, **extra)) for extra in ({}, {"default_system": "Be brief."}))
    history = [{"role": "user", "content": "hello there"}]
    assert with_system.prompt_ids(history)[:len(plain.prompt_ids(history))] != plain.prompt_ids(history)
    base_only = Engine.load(chat_config((chat_model[0], None)))
    assert greedy_answer(base_only, history) != greedy_answer(plain, history)


def test_ctrl_c_stops_the_answer_not_the_chat(chat_model, monkeypatch):
    pushes = []
    real_push = TextStream.push

    def push(self, token):
        pushes.append(token)
        if len(pushes) == 3:
            raise KeyboardInterrupt
        return real_push(self, token)

    monkeypatch.setattr(TextStream, "push", push)
    out = io.StringIO()
    chat.run_chat(chat_config(chat_model), io.StringIO("hello there\nhello there\n"), out)
    first, second = answers(out.getvalue())
    assert first.endswith("[stopped]") and not second.endswith("[stopped]")


def test_long_history_drops_the_oldest_exchanges(chat_model):
    engine = Engine.load(chat_config(chat_model, cutoff_len=60))
    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"message number {turn} about rivers"},
                    {"role": "assistant", "content": "an answer about rivers and towns"}]
    history.append({"role": "user", "content": "last one"})
    fitted = chat.fit_history(engine, history)
    assert fitted[-1]["content"] == "last one" and fitted[0]["role"] == "user"
    assert len(engine.prompt_ids(fitted)) <= 60 - 12 < len(engine.prompt_ids(history))


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "messages[0] needs a `role`"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
])
def test_bad_messages_say_what_is_wrong(messages, fragment):
    with pytest.raises(TunesmithError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        check_messages(messages)


def test_each_turn_reads_only_what_the_turn_before_did_not_leave_in_the_cache(chat_model, monkeypatch):
    from tunesmith.sampling.scheduler import DecodeScheduler
    from tunesmith.sampling.slot_decoder import SlotDecoder

    turns, forward, run_here = [], SlotDecoder.forward, DecodeScheduler.run_here

    def counted(self, tokens, positions, chunks, adapters):
        turns[-1] += sum(len(chunk.ids) for chunk in chunks)
        return forward(self, tokens, positions, chunks, adapters)

    def one_turn(self, *args, **kwargs):
        turns.append(0)
        return run_here(self, *args, **kwargs)

    monkeypatch.setattr(SlotDecoder, "forward", counted)
    monkeypatch.setattr(DecodeScheduler, "run_here", one_turn)
    config = chat_config(chat_model)
    out = io.StringIO()
    messages = ["hello there", "and the river?", "tell me about the town by the river"]
    chat.run_chat(config, io.StringIO("\n".join(messages) + "\n"), out)
    engine, history, prompts = Engine.load(config), [], []
    for message, answer in zip(messages, answers(out.getvalue())):
        history.append({"role": "user", "content": message})
        prompts.append(len(engine.prompt_ids(history)))
        history.append({"role": "assistant", "content": answer})
    assert turns[0] == prompts[0]
    for turn in (1, 2):  # the earlier prompt, at least, comes from the cache the turn before left
        assert 0 < turns[turn] <= prompts[turn] - prompts[turn - 1]
