"""templates.py: each built-in renders its reference format; the tokenizer's Jinja template splits into turns."""

import pytest

from tunesmith.data.templates import JinjaTemplate, get_template
from tunesmith.errors import TunesmithError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]
NO_SYSTEM = CONVERSATION[1:3]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nCiao<|eot_id|>",
    # the tokenizer's eos_token is <|im_end|> (Qwen-like), so that is what `default` puts after each turn
    "default": "System: Be brief.<|im_end|>\nHuman: Hi<|im_end|>\nAssistant:Hello!<|im_end|>\n"
    "Human: Bye<|im_end|>\nAssistant:Ciao<|im_end|>\n",
    "empty": "Be brief.HiHello!<|im_end|>ByeCiao<|im_end|>",
}


def decoded(tokenizer, turns) -> str:
    return tokenizer.decode([t for prompt, response in turns for t in prompt + response])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_renders_reference_format(tokenizer, name):
    turns = get_template(name, tokenizer).encode_turns(tokenizer, CONVERSATION)
    assert len(turns) == 2
    assert decoded(tokenizer, turns) == EXPECTED[name]


def test_qwen_adds_its_default_system(tokenizer):
    turns = get_template("qwen", tokenizer).encode_turns(tokenizer, NO_SYSTEM)
    assert tokenizer.decode(turns[0][0]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_response_segment_ends_with_end_of_turn_token(tokenizer):
    for name, marker in (
        ("chatml", "<|im_end|>"),
        ("llama3", "<|eot_id|>"),
        ("default", tokenizer.eos_token),
    ):
        _, response = get_template(name, tokenizer).encode_turns(tokenizer, NO_SYSTEM)[0]
        assert tokenizer.convert_tokens_to_ids(marker) in response[-2:], name
        assert tokenizer.decode(response).startswith("Hello!")


def test_auto_uses_tokenizer_jinja_and_matches_chatml(tokenizer):
    auto = get_template(None, tokenizer)
    assert isinstance(auto, JinjaTemplate)
    chatml = get_template("chatml", tokenizer)
    assert auto.encode_turns(tokenizer, CONVERSATION) == chatml.encode_turns(tokenizer, CONVERSATION)
    assert auto.encode_prompt(tokenizer, CONVERSATION[:4]) == chatml.encode_prompt(
        tokenizer, CONVERSATION[:4]
    )
    assert auto.stop_token_ids(tokenizer) == chatml.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_jinja_without_end_marker_gets_eos(make_tokenizer):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    plain += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    tokenizer = make_tokenizer(chat_template=plain)
    prompt, response = get_template("auto", tokenizer).encode_turns(tokenizer, NO_SYSTEM)[0]
    assert tokenizer.decode(prompt) == "user: Hi\nassistant: "
    assert tokenizer.decode(response) == "Hello!\n<|im_end|>"


def test_jinja_that_rewrites_history_is_refused(make_tokenizer):
    # renders only the last assistant message: earlier prefixes are not prefixes of later renders
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    tokenizer = make_tokenizer(chat_template=rewriting)
    with pytest.raises(TunesmithError, match="renders earlier turns differently"):
        get_template(None, tokenizer).encode_turns(tokenizer, CONVERSATION)


def test_name_errors(tokenizer, make_tokenizer):
    with pytest.raises(
        TunesmithError, match="unknown template 'qwen3'. Valid: auto, qwen, chatml, qwen3_nothink, llama3, default, empty.*Did you mean 'qwen'"
    ):
        get_template("qwen3", tokenizer)
    chatml_only = make_tokenizer(special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(TunesmithError, match="template 'llama3' needs <\\|eot_id\\|>"):
        get_template("llama3", chatml_only)
    no_template = make_tokenizer(chat_template=None)
    with pytest.raises(TunesmithError, match="no chat_template"):
        get_template(None, no_template)


@pytest.mark.parametrize("name", ["chatml", "llama3", "default"])
def test_encode_prompt_is_the_conversation_up_to_the_assistant_header(tokenizer, name):
    ids = get_template(name, tokenizer).encode_prompt(tokenizer, CONVERSATION[:4])
    assert tokenizer.decode(ids) == EXPECTED[name].rsplit("Ciao", 1)[0]


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("conversation", [CONVERSATION, NO_SYSTEM], ids=["system", "no-system"])
def test_a_builtin_as_jinja_renders_its_reference_format(tokenizer, name, conversation):
    """to_jinja is what a GGUF export carries as its chat_template: the same text as the reference."""
    template = get_template(name, tokenizer)
    expected = "".join(p + r for p, r in template.render_turns(tokenizer, conversation))
    jinja = template.to_jinja(tokenizer)
    assert tokenizer.apply_chat_template(conversation, chat_template=jinja, tokenize=False) == expected
    go = template.to_go_template(tokenizer)  # Ollama's: the same slots around {{ .Content }}
    assert go.count("{{ .Content }}") == 3 and "{{-" not in go
