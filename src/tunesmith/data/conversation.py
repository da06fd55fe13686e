"""A chat client's conversation made into one a template can render, with no message lost.

Training data alternate user and assistant turns (formats.py checks that), but chat clients send other
shapes. For a prompt (`tunesmith chat`, `api`, the board, RL prompts) each case is decided here, once:
- consecutive messages of one role become one turn, their texts joined by a blank line (a template has
  one slot per turn; OpenAI's API accepts such runs);
- an assistant message with no user message before it (a greeting) follows an empty user turn: the
  built-in templates open the assistant turn inside the user slot, so that is the only way to write it;
- a system message after the first stays where it is when it follows an answer (it is rendered there in
  the template's system slot); one that follows an unanswered user message cannot be placed and is refused.
`check_rendered` then makes sure the rendered prompt holds every message's text in order, so a
tokenizer template that drops or rewrites a message is refused instead of answering something else.
Errors name the message's index in the conversation as the client sent it.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError


def prompt_conversation(messages: list[dict], default_system: str | None = None
                        ) -> tuple[list[dict], list[int | None]]:
    """(turns to render, each turn's index in `messages`, None for a turn added here): runs of one role
    merged, an empty user turn before an unprompted answer, `default_system` first when there is no system."""
    turns: list[dict] = []
    origins: list[int | None] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
            continue
        if role == "system" and turns and turns[-1]["role"] == "user":
            raise TunesmithError(f"messages[{index}] is a system message after a user message that has no answer "
                                 "yet; the chat template cannot place it there. Send it first, or after an "
                                 "assistant message.")
        if role == "assistant" and (not turns or turns[-1]["role"] != "user"):
            turns.append({"role": "user", "content": ""})
            origins.append(None)
        turns.append({"role": role, "content": content})
        origins.append(index)
    if default_system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": default_system})
        origins.insert(0, None)
    return turns, origins


def check_rendered(text: str, turns: list[dict], origins: list[int | None]) -> None:
    """Refuse a rendered prompt that lacks a message's text (whitespace at its ends aside) or reorders them."""
    at = 0
    for turn, origin in zip(turns, origins):
        content = turn["content"].strip()
        if origin is None or not content:
            continue
        found = text.find(content, at)
        if found < 0:
            raise TunesmithError(f"messages[{origin}] ({turn['role']}) would be left out of the prompt: the chat "
                                 "template does not render it. Reorder the messages or set a built-in `template`.")
        at = found + len(content)
