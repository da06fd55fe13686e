"""Chat templates: turn a conversation into per-turn (prompt, response) token ids for loss masking.

Turn i = (prompt_i, response_i): prompt_i holds the user message with the assistant header (and, on
the first turn, the prefix and system message); response_i holds the assistant content followed by
the end-of-turn marker, so the model learns to stop. Two kinds of template:

- `FormatTemplate`: a built-in, LLaMA-Factory's slot strings (`qwen`/`chatml`, `llama3`, `default`, `empty`).
- `JinjaTemplate`: the tokenizer's own `chat_template` (name None or "auto"). Segments come from
  rendering growing prefixes of the conversation and checking each is a prefix of the next.

Every segment is tokenised on its own with `add_special_tokens=False`, like LLaMA-Factory, so the
ids of a conversation are exactly the concatenation of its segments. A prompt (`encode_prompt`) is first
shaped for the template by conversation.py (roles that do not alternate) and keeps special-token text in
messages as text (plain_text.py).
Usage: `template = get_template("qwen", tokenizer); turns = template.encode_turns(tokenizer, messages)`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.data.conversation import check_rendered, prompt_conversation
from tunesmith.data.plain_text import PlainText
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _encode_segments(tokenizer: PreTrainedTokenizerBase, turns: list) -> list:
    def encode(text: str) -> list:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    return [(encode(prompt), encode(response)) for prompt, response in turns]


def _encode_prompt(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, messages: list,
                   default_system: str | None) -> list:
    """Ids asking for the next assistant turn, segmented as in training (each segment tokenised on its own).
    The conversation is first shaped for the template (conversation.py) and its special-token text kept
    as text (plain_text.py); a message the template would not render is an error, never dropped."""
    turns, origins = prompt_conversation(messages, default_system)
    plain = PlainText(tokenizer)
    turns = [{"role": turn["role"], "content": plain.protect(turn["content"])} for turn in turns]
    segments = template.render_turns(tokenizer, turns + [{"role": "assistant", "content": ""}])
    check_rendered("".join(prompt + response for prompt, response in segments), turns, origins)
    texts = [text for pair in segments[:-1] for text in pair] + [segments[-1][0]]
    return [t for text in texts for t in plain.encode(text)]


def _split_system(messages: list) -> tuple:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


@dataclass(frozen=True)
class FormatTemplate:
    """A built-in template: slot strings with `{content}`, `{bos}` and `{eos}` placeholders."""

    name: str
    """The `template:` value that selects it."""
    user: str
    """Rendered user turn, ending with the assistant header."""
    assistant: str
    """Rendered assistant turn, ending with the end-of-turn marker."""
    system: str = "{content}"
    """Rendered system message, placed before the first user turn."""
    prefix: str = ""
    """Text before the first turn (e.g. the BOS token)."""
    default_system: str = ""
    """System message used when the conversation has none."""
    stop_words: tuple = ()
    """End-of-turn markers; each must be one token of the tokenizer."""

    def _fill(self, slot: str, tokenizer: PreTrainedTokenizerBase, content: str = "") -> str:
        # content goes in last so that a literal "{eos}" inside a message is left alone
        slot = slot.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
        return slot.replace("{content}", content)

    def render_turns(self, tokenizer: PreTrainedTokenizerBase, messages: list) -> list:
        """[(prompt_text, response_text)] per assistant message with the user message before it."""
        system, turns = _split_system(messages)
        system = system or self.default_system
        head = self._fill(self.prefix, tokenizer)
        if system:
            head += self._fill(self.system, tokenizer, system)
        pairs, user = [], ""
        for message in turns:
            if message["role"] == "system":  # a later one, after an answer (conversation.py places it)
                head += self._fill(self.system, tokenizer, message["content"])
            elif message["role"] == "user":
                user = message["content"]
            else:
                prompt = self._fill(self.user, tokenizer, user)
                pairs.append((head + prompt, self._fill(self.assistant, tokenizer, message["content"])))
                head, user = "", ""
        return pairs

    def encode_turns(self, tokenizer: PreTrainedTokenizerBase, messages: list) -> list:
        """[(prompt_ids, response_ids)] per user/assistant pair, each segment tokenised on its own."""
        return _encode_segments(tokenizer, self.render_turns(tokenizer, messages))

    def encode_prompt(self, tokenizer: PreTrainedTokenizerBase, messages: list, default_system: str | None = None
                      ) -> list:
        """Prompt ids for generation from a conversation ending with a user turn."""
        return _encode_prompt(self, tokenizer, messages, default_system)

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list:
        """Token ids that end generation: the stop words and EOS."""
        ids = [tokenizer.convert_tokens_to_ids(word) for word in self.stop_words]
        return list(dict.fromkeys([*ids, tokenizer.eos_token_id]))

    def to_jinja(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The same rendering as a Hugging Face chat_template (for files that carry a template, e.g. GGUF).
        The user slot already ends with the assistant header, so a prompt ends ready for the answer."""
        def text(slot: str) -> str:  # a Jinja expression: literal pieces around message['content']
            before, _, after = self._fill(slot, tokenizer, "\0").partition("\0")
            return "{{ " + " + ".join(part for part in (json.dumps(before), "message['content']", json.dumps(after))
                                      if part != '""') + " }}"

        default = self._fill(self.system, tokenizer, self.default_system) if self.default_system else ""
        return ("{{ " + json.dumps(self._fill(self.prefix, tokenizer)) + " }}"
                "{%- for message in messages -%}"
                "{%- if loop.first and message['role'] != 'system' %}{{ " + json.dumps(default) + " }}{% endif -%}"
                "{%- if message['role'] == 'system' %}" + text(self.system) +
                "{%- elif message['role'] == 'user' %}" + text(self.user) +
                "{%- elif message['role'] == 'assistant' %}" + text(self.assistant) +
                "{%- endif -%}{%- endfor -%}")

    def to_go_template(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The same rendering as an Ollama Modelfile TEMPLATE (Go template over .Messages); the default
        system message goes in the Modelfile's SYSTEM line."""
        def text(slot: str) -> str:
            return self._fill(slot, tokenizer, "{{ .Content }}")

        # no `{{-`: it would trim the newline a slot ends with
        return (self._fill(self.prefix, tokenizer) + "{{ range .Messages }}"
                '{{ if eq .Role "system" }}' + text(self.system) +
                '{{ else if eq .Role "user" }}' + text(self.user) +
                '{{ else if eq .Role "assistant" }}' + text(self.assistant) + "{{ end }}{{ end }}")


CHATML = dict(
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    stop_words=("<|im_end|>",),
)
BUILTIN_TEMPLATES = {
    "qwen": FormatTemplate(
        "qwen",
        **CHATML,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "chatml": FormatTemplate("chatml", **CHATML),
    # LLaMA-Factory's name for Qwen3 without thinking: ChatML with no default system prompt.
    "qwen3_nothink": FormatTemplate("qwen3_nothink", **CHATML),
    "llama3": FormatTemplate(
        "llama3",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        prefix="{bos}",
        stop_words=("<|eot_id|>",),
    ),
    "default": FormatTemplate(
        "default",
        user="Human: {content}{eos}\nAssistant:",
        assistant="{content}{eos}\n",
        system="System: {content}{eos}\n",
    ),
    # No markers at all; EOS is still appended so that generation can stop.
    "empty": FormatTemplate("empty", user="{content}", assistant="{content}{eos}"),
}


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own chat_template, split into turns by rendering growing prefixes."""

    name: str = "auto"

    def _render(self, tokenizer: PreTrainedTokenizerBase, messages: list, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _turn_end_tokens(self, tokenizer: PreTrainedTokenizerBase, response: str, content: str) -> list:
        """Special tokens the template puts after the assistant content (its end-of-turn marker)."""
        tail = response[response.rfind(content) + len(content) :] if content in response else response
        return [token for token in tokenizer.all_special_tokens if token in tail]

    def render_turns(self, tokenizer: PreTrainedTokenizerBase, messages: list) -> list:
        """[(prompt_text, response_text)] per assistant message, cut from renders of growing prefixes."""
        pairs, rendered = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(tokenizer, messages[:index], generation_prompt=True)
            full = self._render(tokenizer, messages[: index + 1], generation_prompt=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise TunesmithError(
                    "the tokenizer's chat_template renders earlier turns differently once later turns are added "
                    f"(at message {index}), so prompt and response tokens cannot be separated. Set `template` to a "
                    f"built-in one ({', '.join(BUILTIN_TEMPLATES)}) that matches the model."
                )
            response = full[len(prompt) :]
            if not self._turn_end_tokens(tokenizer, response, message["content"]):
                response += tokenizer.eos_token  # the template never closes a turn: teach EOS instead
            pairs.append((prompt[len(rendered) :], response))
            rendered = full
        return pairs

    def encode_turns(self, tokenizer: PreTrainedTokenizerBase, messages: list) -> list:
        """[(prompt_ids, response_ids)] per assistant message, each segment tokenised on its own."""
        return _encode_segments(tokenizer, self.render_turns(tokenizer, messages))

    def encode_prompt(self, tokenizer: PreTrainedTokenizerBase, messages: list, default_system: str | None = None
                      ) -> list:
        """Prompt ids for generation from a conversation ending with a user turn."""
        return _encode_prompt(self, tokenizer, messages, default_system)

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list:
        """EOS plus the special tokens the template puts after an assistant message."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        _, response = self.render_turns(tokenizer, probe)[0]
        specials = self._turn_end_tokens(tokenizer, response, "y")
        return list(dict.fromkeys([*tokenizer.convert_tokens_to_ids(specials), tokenizer.eos_token_id]))


ChatTemplate = FormatTemplate | JinjaTemplate


def _check_tokens(template: FormatTemplate, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = tokenizer.get_vocab()
    missing = [word for word in template.stop_words if word not in vocab]
    needs_eos = "{eos}" in template.user + template.assistant + template.system
    if needs_eos and tokenizer.eos_token is None:
        missing.append("an eos_token")
    if missing:
        raise TunesmithError(
            f"template '{template.name}' needs {', '.join(missing)}, which the tokenizer does not have as one "
            "token, so the model could not learn where a turn ends. Use the template that matches the model "
            "(or `template: auto` to use the tokenizer's own chat_template)."
        )


def get_template(name: str | None, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The named built-in template, or the tokenizer's own chat_template for None / "auto"."""
    if name in (None, "auto"):
        if getattr(tokenizer, "chat_template", None):
            return JinjaTemplate()
        raise TunesmithError(
            "`template` is not set and the tokenizer has no chat_template. Set `template` to one of: "
            f"{', '.join(BUILTIN_TEMPLATES)}."
        )
    if name not in BUILTIN_TEMPLATES:
        close = difflib.get_close_matches(name, list(BUILTIN_TEMPLATES), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise TunesmithError(
            f"unknown template '{name}'. Valid: auto, {', '.join(BUILTIN_TEMPLATES)} "
            f"(auto uses the tokenizer's own chat_template).{hint}"
        )
    template = BUILTIN_TEMPLATES[name]
    _check_tokens(template, tokenizer)
    return template
