"""`tunesmith chat cfg.yaml`: talk to the base model plus its adapters in the terminal, as LLaMA-Factory's
`llamafactory-cli chat` does.

Tokens are printed as they are generated and the conversation is kept, so each answer sees the turns
before it (the oldest turns are dropped when the prompt would not leave room for `max_new_tokens`
within `cutoff_len`). `clear` forgets the history, `exit` (or end of input) leaves. Ctrl-C during an
answer stops that answer and keeps the part already shown; Ctrl-C at the prompt leaves. When stdin is
not a terminal every line is one message, so a chat can be scripted: `printf 'hi\\nexit\\n' | tunesmith chat cfg.yaml`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tunesmith.config import RunConfig
from tunesmith.inference.engine import Engine, TextStream, trained_folder
from tunesmith.inference.served_models import with_recorded_template

WELCOME = "Chat with the model: `clear` forgets the history, `exit` leaves. Ctrl-C stops an answer."


def run_chat(config: RunConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """The chat loop: read a message, answer it streaming, keep the history (stdin/stdout by default)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    folder = trained_folder(config.model)
    engine = with_recorded_template(Engine.load(config), config.data.template, folder, folder.name,
                                    lambda line: print(line, file=sys.stderr))
    interactive = stdin.isatty()
    print(WELCOME, file=stdout)
    history: list[dict] = []
    while True:
        message = _read_message(stdin, stdout, interactive)
        if message is None or message == "exit":
            return
        if message == "clear":
            history = []
            print("History cleared.", file=stdout)
            continue
        if not message:
            continue
        history.append({"role": "user", "content": message})
        history = fit_history(engine, history)
        stdout.write("Assistant: ")
        stdout.flush()
        answer = stream_answer(engine, history, stdout)
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def stream_answer(engine: Engine, history: list[dict], stdout: TextIO) -> str:
    """Generate an answer to `history`, printing it piece by piece; the text shown is returned."""
    stream, stop, shown = TextStream(engine), set(engine.stop_ids), []

    def on_token(row: int, token: int) -> None:
        if token not in stop:
            piece = stream.push(token)
            shown.append(piece)
            stdout.write(piece)
            stdout.flush()

    try:
        engine.generate([history], engine.sampling, on_token=on_token)
    except KeyboardInterrupt:  # this answer ends here; the chat goes on
        stdout.write(" [stopped]")
    return "".join(shown)


def fit_history(engine: Engine, history: list[dict]) -> list[dict]:
    """Drop the oldest exchanges until the prompt leaves `max_new_tokens` of room within `cutoff_len`."""
    budget = engine.cutoff_len - engine.sampling.max_new_tokens
    while len(history) > 1 and len(engine.prompt_ids(history)) > budget:
        history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
    return history


def _read_message(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next message, stripped; None at end of input (or Ctrl-C at the prompt)."""
    stdout.write("\nUser: ")
    stdout.flush()
    try:
        line = stdin.readline()
    except KeyboardInterrupt:
        return None
    if not line:
        return None
    if not interactive:
        stdout.write(line if line.endswith("\n") else line + "\n")  # echo, so a transcript reads like a chat
    return line.strip()
