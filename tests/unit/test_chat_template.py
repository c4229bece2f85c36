"""Chat templates: the model's own template, the ChatML fallback, helpers, errors and the sandbox."""
from datetime import datetime

import pytest

from freehold.errors import FreeholdError, InvalidRequestError
from freehold.models.locate import default_model_path
from freehold.tokenizer import Tokenizer
from freehold.tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateOptions

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def _render(source: str, messages=(), **kwargs) -> str:
    return ChatTemplate(source, TOKENS).render(list(messages), **kwargs)


def test_model_template_adds_default_system_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert prompt == SMOL_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_model_template_with_system_and_no_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n4<|im_end|>\n")


def test_text_parts_are_joined(tokenizer):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = tokenizer.apply_chat_template([{"role": "user", "content": parts}])
    assert as_parts == tokenizer.apply_chat_template([{"role": "user", "content": "first\nsecond"}])


def test_non_text_part_is_rejected(tokenizer):
    content = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(InvalidRequestError, match="image_url"):
        tokenizer.apply_chat_template([{"role": "user", "content": content}])


def test_caller_messages_are_not_modified(tokenizer):
    message = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    tokenizer.apply_chat_template([message])
    assert message == {"role": "user", "content": [{"type": "text", "text": "hi"}]}


def test_missing_template_falls_back_to_chatml(tokenizer):
    bare = Tokenizer(tokenizer.backend, tokenizer.special, None)
    assert not bare.has_chat_template and tokenizer.has_chat_template
    assert bare.chat_template == CHATML_TEMPLATE
    prompt = bare.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_model_stops_at_end_of_turn(tokenizer):
    im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    assert im_end in tokenizer.eos_token_ids and endoftext in tokenizer.eos_token_ids
    assert tokenizer.eos_token_ids[0] == tokenizer.eos_token_id == im_end
    assert tokenizer.token_to_id("<|im_start|>") not in tokenizer.eos_token_ids


def test_raise_exception_gives_invalid_request_error(tokenizer):
    with pytest.raises(InvalidRequestError, match="only user and assistant roles") as raised:
        _render("{% if messages[0]['role'] == 'tool' %}{{ raise_exception('only user and assistant roles') }}"
                "{% endif %}", [{"role": "tool", "content": "x"}])
    assert isinstance(raised.value, FreeholdError) and raised.value.param == "messages"


def test_template_that_does_not_compile_gives_freehold_error():
    with pytest.raises(FreeholdError, match="does not compile"):
        ChatTemplate("{% for message in messages %}{{ message }", TOKENS)


def test_type_error_inside_template_gives_freehold_error():
    with pytest.raises(FreeholdError, match="failed"):
        _render("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{% set _ = messages.append({'role': 'user'}) %}",
    "{% set ns = namespace(__class__=1) %}",
])
def test_sandbox_refuses_unsafe_access(source):
    with pytest.raises(FreeholdError, match="unsafe|immutable|namespace attribute"):
        _render(source, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ raise_exception.__globals__ }}", "{{ dict.__class__ }}",
                                    "{{ messages.__class__ }}"])
def test_sandbox_hides_dunder_attributes(source):
    assert _render(source, [{"role": "user", "content": "x"}]) == ""  # an unsafe attribute reads as undefined


def test_tojson_keeps_unicode_and_html():
    out = _render("{{ messages[0] | tojson }}", [{"role": "user", "content": "<b>é</b>"}])
    assert out == '{"role": "user", "content": "<b>é</b>"}'
    assert _render("{{ {'a': 1} | tojson(indent=2) }}") == '{\n  "a": 1\n}'


def test_helpers_and_variables():
    assert _render("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}") == "<s>|</s>|"
    assert _render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert _render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                   "{{ ns.n }}", [{"role": "user"}] * 3) == "3"
    assert _render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "01"
    assert _render("{{ dict(a=1) | tojson }}") == '{"a": 1}'


def test_tools_and_generation_prompt_reach_the_template():
    source = "{% if tools %}{{ tools | length }} tools{% endif %}{% if add_generation_prompt %}>{% endif %}"
    assert _render(source, tools=[{"type": "function"}, {"type": "function"}]) == "2 tools>"
    assert _render(source, add_generation_prompt=False) == ""


def test_generation_block_renders_its_body():
    source = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    assert _render(source, [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "[a][b]"


def test_trim_and_lstrip_blocks_like_transformers():
    source = ("{% for m in messages %}\n    {% if m['role'] == 'user' %}\n{{ m['content'] }}\n    {% endif %}\n"
              "{% endfor %}")
    assert _render(source, [{"role": "user", "content": "hi"}]) == "hi\n"


# ---- options: add_generation_prompt, continue_final_message, extra variables (vLLM's request fields) ----------
def test_continue_final_message_ends_inside_the_last_message(tokenizer):
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "My favourite is "}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    cont = tokenizer.apply_chat_template(messages, options=TemplateOptions(False, True))
    assert full.startswith(cont) and cont.endswith("My favourite is") and "<|im_end|>" in full[len(cont):]


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "text to continue"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}], "verbatim"),
])
def test_continue_final_message_needs_text_the_template_writes(messages, reason):
    hides_assistant = ChatTemplate("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}"
                                   "{% endif %}{% endfor %}", {})
    with pytest.raises(InvalidRequestError, match=reason) as err:
        hides_assistant.render(messages, options=TemplateOptions(False, True))
    assert err.value.param == "continue_final_message"


def test_continue_and_generation_prompt_are_exclusive(tokenizer):
    with pytest.raises(InvalidRequestError) as err:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], options=TemplateOptions(True, True))
    assert err.value.param == "continue_final_message"


def test_extra_variables_reach_the_template_but_cannot_replace_reserved_ones():
    template = ChatTemplate("{{ 'think' if enable_thinking else 'plain' }}:{{ messages[0].name }}", {})
    messages = [{"role": "user", "content": "x", "name": "alice"}]
    assert template.render(messages, options=TemplateOptions(variables={"enable_thinking": True})) == "think:alice"
    assert template.render(messages) == "plain:alice"
    with pytest.raises(InvalidRequestError) as err:
        template.render(messages, options=TemplateOptions(variables={"bos_token": "<x>"}))
    assert err.value.param == "chat_template_kwargs.bos_token"


def test_use_chat_template_replaces_the_models_template():
    tok = Tokenizer.from_model_path(default_model_path())
    tok.use_chat_template("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    with pytest.raises(FreeholdError):
        tok.use_chat_template("{% for %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"  # a bad one changes nothing
