"""OpenAI's message forms turned into the {role, content: str} turns the engine renders.

Clients send what OpenAI accepts today: content as a list of parts (`[{"type": "text", "text": ...}]`,
joined here with newlines; an image or audio part is a 400 naming it, as this server reads only text) and
the `developer` role (OpenAI's new name for `system` on its reasoning models, treated as `system`).
Anything else passes through unchanged for `check_messages` to judge.
"""

from __future__ import annotations

from typing import Any

from tunesmith.inference.api_errors import ApiError

ROLE_ALIASES = {"developer": "system"}


def plain_messages(messages: Any) -> Any:
    """`messages` with content-part lists joined into text and role aliases resolved (new dicts; the
    request is not changed)."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for index, message in enumerate(messages):
        if isinstance(message, dict):
            role = message.get("role")
            message = {**message, "role": ROLE_ALIASES.get(role, role) if isinstance(role, str) else role}
            if isinstance(message.get("content"), list):
                message["content"] = _joined_text(message["content"], index)
        plain.append(message)
    return plain


def _joined_text(parts: list, index: int) -> str:
    """The text parts of one message's content, joined by newlines; any other part is refused."""
    texts = []
    for number, part in enumerate(parts):
        where = f"messages[{index}].content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a {str(kind)[:40]!r} part" if kind is not None else "not a content part"
            raise ApiError(400, f"{where} is {what}; this server reads only text parts "
                                '({"type": "text", "text": ...}).', param=where)
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.text must be a string.", param=where)
        texts.append(part["text"])
    return "\n".join(texts)
