"""Convert alpaca / sharegpt records into one conversation shape: `[{"role", "content"}, ...]`.

Roles are "system" (optional, first), then "user" and "assistant" alternating. For supervised data
the conversation ends with an assistant turn; for preference (ranking) data the prompt ends with a
user turn and the two candidate answers are kept apart in a `PreferenceExample`.

- alpaca: user = instruction + "\n" + input (input only when non-empty), assistant = output;
  `history` = [[user, assistant], ...] turns before the current one; `system` column optional.
- sharegpt: a list of `{from, value}` messages with LLaMA-Factory's role names (human/gpt/system);
  `tags` remap the keys and names (OpenAI style: role/content/user/assistant).

Functions raise `BadRecord` (what is wrong + how to fix); the loader adds file and record index.
Tool-calling roles (observation/function_call) are rejected on purpose: no template here renders them.
"""

from dataclasses import dataclass


class BadRecord(ValueError):
    """One record cannot be converted; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred and a dispreferred assistant answer (DPO / reward-model data)."""

    prompt_messages: list
    """Conversation ending with a user turn."""
    chosen: str
    """The preferred assistant answer."""
    rejected: str
    """The dispreferred assistant answer."""


def _text(record: dict, column: str | None, required: bool) -> str:
    """The string value of `column`; absent, None or (for optional columns) empty reads as ""."""
    if column is None or record.get(column) is None:
        if required:
            raise BadRecord(
                f"missing column '{column}' (record has: {', '.join(record) or 'nothing'}); add it, or map the "
                'right column name under "columns" in dataset_info.json'
            )
        return ""
    value = record[column]
    if not isinstance(value, str):
        raise BadRecord(f"column '{column}' is a {type(value).__name__}, expected text; store it as a string")
    return value


def check_turns(messages: list, ends_with: str) -> list:
    """Validate role order (system?, user, assistant, user, ...) and non-empty assistant turns."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise BadRecord("the conversation has no user turn; add one")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRecord(
                f"turn {index} is '{message['role']}' but '{expected}' was expected: after an optional system "
                "message, user and assistant turns must alternate, starting with user"
            )
        if not isinstance(message["content"], str):
            raise BadRecord(f"turn {index} content is a {type(message['content']).__name__}, expected text")
        if expected == "assistant" and not message["content"].strip():
            raise BadRecord(
                f"turn {index} is an empty assistant response; write the response or drop the record"
            )
    if turns[-1]["role"] != ends_with:
        raise BadRecord(
            f"the last turn is '{turns[-1]['role']}' but must be '{ends_with}'"
            + (" (the answer to learn)" if ends_with == "assistant" else " (chosen/rejected answer it)")
        )
    return messages


def _alpaca_prompt(record: dict, columns: dict) -> list:
    """System, history turns and the current user turn of an alpaca record."""
    messages = []
    system = _text(record, columns.get("system"), required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(columns["history"]) if columns.get("history") else None
    for pair in history or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRecord(
                f"column '{columns['history']}' must be a list of [instruction, response] pairs of strings, "
                f"found item {pair!r}"
            )
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, columns.get("prompt"), required=True)
    query = _text(record, columns.get("query"), required=False)
    user = "\n".join(part for part in (instruction, query) if part)
    if not user:
        raise BadRecord(
            f"both '{columns.get('prompt')}' and '{columns.get('query')}' are empty; write the instruction"
        )
    return messages + [{"role": "user", "content": user}]


def alpaca_to_messages(record: dict, columns: dict) -> list:
    """An alpaca record as a conversation ending with the `response` column's answer."""
    response = _text(record, columns.get("response"), required=True)
    return check_turns(
        _alpaca_prompt(record, columns) + [{"role": "assistant", "content": response}], "assistant"
    )


def alpaca_to_prompt(record: dict, columns: dict) -> list:
    """An alpaca record for RL: the prompt, then the `response` column's answer when it has one (a
    prompt-only record, with no or an empty output, ends with its user turn)."""
    messages = _alpaca_prompt(record, columns)
    response = _text(record, columns.get("response"), required=False)
    if response.strip():
        messages.append({"role": "assistant", "content": response})
    return check_turns(messages, messages[-1]["role"])


def alpaca_to_preference(record: dict, columns: dict) -> PreferenceExample:
    """An alpaca ranking record: prompt columns plus `chosen` / `rejected` answer strings."""
    prompt = check_turns(_alpaca_prompt(record, columns), "user")
    chosen = _text(record, columns.get("chosen", "chosen"), required=True)
    rejected = _text(record, columns.get("rejected", "rejected"), required=True)
    _check_answers(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected)


def _role_names(tags: dict) -> dict:
    return {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        tags["observation_tag"]: "observation",
        tags["function_tag"]: "function_call",
    }


def _sharegpt_message(message, position: str, tags: dict) -> dict:
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    if not isinstance(message, dict) or role_key not in message or content_key not in message:
        raise BadRecord(
            f"{position} must be an object with '{role_key}' and '{content_key}' keys, found {message!r}; "
            'if the file uses other keys (e.g. role/content), set "tags" in dataset_info.json'
        )
    names = _role_names(tags)
    role = names.get(message[role_key])
    if role is None:
        raise BadRecord(
            f"{position} has role '{message[role_key]}', expected one of {', '.join(names)}; "
            'map the file\'s role names under "tags" in dataset_info.json'
        )
    if role in ("observation", "function_call"):
        raise BadRecord(
            f"{position} is a tool-calling message ('{message[role_key]}'), not supported yet; drop it"
        )
    return {"role": role, "content": message[content_key]}


def _sharegpt_prompt(record: dict, columns: dict, tags: dict) -> list:
    column = columns["messages"]
    raw = record.get(column)
    if not isinstance(raw, list) or not raw:
        raise BadRecord(
            f"column '{column}' must be a non-empty list of messages, found {type(raw).__name__}; "
            'set "columns": {"messages": ...} in dataset_info.json if the list has another name'
        )
    messages = [_sharegpt_message(m, f"message {i} of '{column}'", tags) for i, m in enumerate(raw)]
    system = _text(record, columns.get("system"), required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def sharegpt_to_messages(record: dict, columns: dict, tags: dict) -> list:
    """A sharegpt record as a conversation ending with an assistant turn."""
    return check_turns(_sharegpt_prompt(record, columns, tags), "assistant")


def sharegpt_to_prompt(record: dict, columns: dict, tags: dict) -> list:
    """A sharegpt record for RL: a conversation ending with a user turn (prompt only) or an assistant one."""
    messages = _sharegpt_prompt(record, columns, tags)
    return check_turns(messages, "assistant" if messages[-1]["role"] == "assistant" else "user")


def sharegpt_to_preference(record: dict, columns: dict, tags: dict) -> PreferenceExample:
    """A sharegpt ranking record: messages ending with a user turn, `chosen` / `rejected` assistant messages."""
    prompt = check_turns(_sharegpt_prompt(record, columns, tags), "user")
    answers = []
    for key in ("chosen", "rejected"):
        column = columns.get(key, key)
        message = _sharegpt_message(record.get(column), f"column '{column}'", tags)
        if message["role"] != "assistant":
            raise BadRecord(
                f"column '{column}' has role '{message['role']}'; it must be an assistant message"
            )
        answers.append(message["content"])
    _check_answers(*answers)
    return PreferenceExample(prompt, answers[0], answers[1])


def _check_answers(chosen, rejected) -> None:
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, str) or not answer.strip():
            raise BadRecord(
                f"the {name} answer is empty or not text; every preference pair needs two answers"
            )


@dataclass(frozen=True)
class KTOExample:
    """One answer to a prompt, marked desirable or not (KTO's unpaired data: LLaMA-Factory's `kto_tag`)."""

    prompt_messages: list
    """Conversation ending with a user turn."""
    completion: str
    desirable: bool


def to_kto_example(record: dict, spec) -> KTOExample:
    """A supervised record (alpaca or sharegpt) plus its boolean `kto_tag` column."""
    messages = CONVERTERS[(spec.formatting, False)](record, spec)
    column = spec.columns["kto_tag"]
    tag = record.get(column)
    if not isinstance(tag, bool):
        raise BadRecord(f'the KTO label "{column}" (columns: kto_tag) must be true (desirable answer) or false '
                        f"(undesirable), got {tag!r}")
    return KTOExample(messages[:-1], messages[-1]["content"], tag)


# (formatting, ranking) -> record converter
CONVERTERS = {
    ("alpaca", False): lambda record, spec: alpaca_to_messages(record, spec.columns),
    ("sharegpt", False): lambda record, spec: sharegpt_to_messages(record, spec.columns, spec.tags),
    ("alpaca", True): lambda record, spec: alpaca_to_preference(record, spec.columns),
    ("sharegpt", True): lambda record, spec: sharegpt_to_preference(record, spec.columns, spec.tags),
}

# formatting -> converter of a record whose answer is optional (PPO/GRPO prompts)
PROMPT_CONVERTERS = {
    "alpaca": lambda record, spec: alpaca_to_prompt(record, spec.columns),
    "sharegpt": lambda record, spec: sharegpt_to_prompt(record, spec.columns, spec.tags),
}
